"""A teacher behind an HTTP server: vLLM, SGLang or `opd serve-teacher`, scoring token ids.

Nothing is re-tokenised: each row's token ids (prompt + sampled completion, padding removed) are
sent as they are, and the server returns log p(x_j | x_<j) for every position j >= 1.

Two wire formats:
- "vllm" (also `opd serve-teacher`): POST {url}/completions with `prompt` = a list of token-id
  lists, `max_tokens: 1`, `prompt_logprobs: k`. Each choice's `prompt_logprobs` is a list with
  `null` first, then one {"<token id>": {"logprob": ..., "rank": ...}, ...} per position holding
  the actual token plus the top-k.
- "sglang": POST {root}/generate with `input_ids`, `return_logprob`, `logprob_start_len: 0`,
  `top_logprobs_num: k`. Each result's `meta_info.input_token_logprobs` is a list of
  [logprob, token_id, text] with a null logprob first; `input_top_logprobs` has the top-k.

Requests go out `concurrency` at a time, `batch_rows` rows each. A 5xx, a timeout, a dropped
connection or a malformed response is retried with exponential backoff and jitter (or after the
server's `Retry-After`, on a 429 or 503; a 429, "busy", does not use up a retry until
(retries + 1) x timeout have passed); after `retries` retries (or at once, for a 4xx that no
retry can fix) the step fails with one line that says why, and the step's other requests stop.

Whether the server reads the student's ids as the same tokens is asked before step 1, by
tokenizer_check.py.
"""

from __future__ import annotations

import email.utils
import math
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from datetime import datetime, timezone
from typing import NamedTuple

import httpx
import torch

from opd.errors import OpdError
from opd.types import LOGP_FLOOR, Rollouts


class _Retryable(Exception):
    pass


class _Again(NamedTuple):
    """A try to be repeated: the HTTP status (0: none), why, and the wait the server asked for."""

    code: int
    last: str
    asked: float | None = None


class Refused(NamedTuple):
    """A 4xx (or 501) answer, returned instead of raised when the caller asked for it."""

    code: int
    detail: str


class ServedTeacher:
    def __init__(
        self,
        url: str,
        model: str = "",
        api_key: str = "",
        api: str = "vllm",
        timeout: float = 60.0,
        retries: int = 4,
        backoff: float = 0.5,
        concurrency: int = 4,
        batch_rows: int = 16,
        transport: httpx.BaseTransport | None = None,
    ):
        self.url = url.rstrip("/")
        try:
            httpx.URL(self.url)
        except httpx.InvalidURL as e:
            raise OpdError(f"teacher URL {url!r} is not valid ({e})") from None
        self.max_len = None  # the server's context, when it says
        self.tokenizer_check = None  # (status, detail) once checked (teachers.tokenizer_check)
        self.bytes_received = 0  # response bodies, for measuring what scoring moves
        self.api = api
        self.retries = retries
        self.backoff = backoff
        self.concurrency = concurrency
        self.batch_rows = batch_rows
        self.rng = random.Random()  # backoff jitter (replaceable, so tests can seed it)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(
            timeout=timeout,
            headers=headers,
            transport=transport,
            limits=httpx.Limits(max_connections=max(concurrency, 1)),
        )
        self.pool = ThreadPoolExecutor(max(concurrency, 1), thread_name_prefix="opd-teacher")
        try:
            self.model = model or (self._discover_model() if api == "vllm" else "")
        except OpdError:
            self.close()
            raise

    # -- the Teacher protocol -------------------------------------------------------------

    def score(self, rollouts: Rollouts) -> torch.Tensor:
        """(B, T) log-probs of the sampled tokens (0 outside completions)."""
        return self.score_topk(rollouts, 0)[0]

    def score_topk(self, rollouts: Rollouts, k: int):
        """Sampled-token log-probs, plus the teacher's top-k ids and log-probs when k > 0.

        Returns (lp_BT, ids_BTK, lp_BTK); the last two are None for k = 0. Each position holds
        the top-k entries and the sampled token when it is outside them (K = k + 1), padded
        with id -1 and log-prob -inf.
        """
        rows = row_tokens(rollouts)
        results = self.fan_out(
            len(rows), lambda c, stop: self._request([rows[i] for i in c], k, stop)
        )
        per_row = [r for part in results for r in part]
        B, T = rollouts.tokens_BT.shape
        lp_BT = torch.zeros(B, T)
        ids_BTK = torch.full((B, T, k + 1), -1, dtype=torch.long) if k else None
        lpk_BTK = torch.full((B, T, k + 1), -math.inf) if k else None
        mask_BT = rollouts.completion_mask_BT.cpu()
        first_B = first_real_column(rollouts.attention_mask_BT).tolist()
        for b, (lps, tops) in enumerate(per_row):
            cols_C = mask_BT[b].nonzero().flatten()
            j_C = cols_C - first_B[b]  # index of each completion token in the row sent
            lp_BT[b, cols_C] = torch.tensor(lps)[j_C]
            if k and len(cols_C):  # one tensor per row: entries padded to k + 1
                tops_C = [tops[j][: k + 1] for j in j_C.tolist()]
                pad = [[(-1, -math.inf)] * (k + 1 - len(t)) for t in tops_C]
                rows_C = [t + p for t, p in zip(tops_C, pad, strict=True)]
                ids_BTK[b, cols_C] = torch.tensor([[e[0] for e in r] for r in rows_C])
                lpk_BTK[b, cols_C] = torch.tensor([[e[1] for e in r] for r in rows_C])
        device = rollouts.tokens_BT.device
        if k:
            return lp_BT.to(device), ids_BTK.to(device), lpk_BTK.to(device)
        return lp_BT.to(device), None, None

    def fan_out(self, n_rows: int, request) -> list:
        """request(row indices, stop) for each `batch_rows` of the n rows, `concurrency` at a
        time; the answers in order. The first request to fail for good raises here at once, and
        the others stop retrying."""
        chunks = [
            list(range(s, min(s + self.batch_rows, n_rows)))
            for s in range(0, n_rows, self.batch_rows)
        ]
        stop = threading.Event()  # set once a request fails for good: the others stop retrying
        futures = [self.pool.submit(request, c, stop) for c in chunks]
        try:
            for future in as_completed(futures):
                future.result()  # the first failure raises here, without waiting for the rest
            return [f.result() for f in futures]
        finally:
            stop.set()
            for future in futures:
                future.cancel()  # those not started yet

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.client.close()

    # -- HTTP -----------------------------------------------------------------------------

    def _discover_model(self) -> str:
        """The served model's name, when the server serves exactly one."""
        body = self._call("GET", f"{self.url}/models", None, "listing models")
        try:
            names = [m["id"] for m in body["data"]]
            self.max_len = body["data"][0].get("max_model_len") if len(names) == 1 else None
        except (KeyError, TypeError, AttributeError):
            raise OpdError(f"teacher {self.url}: /models did not return a model list") from None
        if len(names) != 1:
            raise OpdError(
                f"teacher {self.url} serves {len(names)} models ({', '.join(names)}); "
                "name one with model.teacher_model"
            )
        return names[0]

    def _request(self, rows: list[list[int]], k: int, stop: threading.Event | None = None):
        if self.api == "sglang":
            root = self.url.removesuffix("/v1")
            payload = {
                "input_ids": rows,
                "sampling_params": {"max_new_tokens": 1, "temperature": 0.0},
                "return_logprob": True,
                "logprob_start_len": 0,
                "top_logprobs_num": k,
            }
            return self._call("POST", f"{root}/generate", payload, "scoring", rows, k, stop)
        payload = {
            "model": self.model,
            "prompt": rows,
            "max_tokens": 1,
            "temperature": 0.0,
            "prompt_logprobs": k,
        }
        return self._call("POST", f"{self.url}/completions", payload, "scoring", rows, k, stop)

    def _call(
        self, method, url, payload, what, rows=None, k=0, stop=None, refusals=False, decode=None
    ):
        """The parsed answer (or body; or `decode(response)`, a malformed one raising); with
        `refusals`, a 4xx other than 401/403 (or a 501) comes back as a Refused instead of
        stopping the run.

        A 429 (the server is busy: come back later) is not a failure: it is tried again without
        using up a retry for as long as every try could have timed out, (retries + 1) x timeout;
        a busy server that never frees up then fails like any other."""
        stop = stop or threading.Event()
        cap = self.client.timeout.read or 60.0
        busy_until = time.monotonic() + (self.retries + 1) * cap
        failures = 0
        while True:
            if stop.is_set():  # a sibling request failed for good: the step is over
                raise OpdError(f"teacher {self.url}: {what} stopped; another request failed")
            outcome = self._try(method, url, payload, rows, k, refusals, cap, decode)
            if not isinstance(outcome, _Again):
                return outcome
            wait = outcome.asked
            if not (outcome.code == 429 and time.monotonic() + (wait or 0) < busy_until):
                failures += 1
                if failures > self.retries:
                    raise OpdError(
                        f"teacher {self.url}: {what} failed {failures} times; last: {outcome.last}"
                    )
            if wait is None:  # equal jitter: requests that failed together come back apart
                full = self.backoff * 2 ** max(failures - 1, 0)
                wait = self.rng.uniform(full / 2, full)
            else:  # the server's Retry-After, and up to `backoff` more for the same reason
                wait += self.rng.uniform(0, self.backoff)
            stop.wait(wait)

    def _try(self, method, url, payload, rows, k, refusals, cap, decode=None):
        """One request: the answer, a Refused, an _Again (to be retried), or OpdError."""
        try:
            response = self.client.request(method, url, json=payload)
        except httpx.TimeoutException:
            return _Again(0, f"no answer within {self.client.timeout.read} s (remote.timeout)")
        except httpx.TransportError as e:
            return _Again(0, f"connection failed ({type(e).__name__}: {e})")
        code = response.status_code
        if refusals and (code == 501 or (400 <= code < 500 and code not in (401, 403, 408, 429))):
            return Refused(code, _detail(response))
        if code >= 500 or code in (408, 429):
            return _Again(code, f"HTTP {code}: {_detail(response)}", _retry_after(response, cap))
        if code >= 400:
            raise OpdError(_client_error(self.url, response, k))
        self.bytes_received += len(response.content)
        try:
            if decode is not None:
                return decode(response)
            body = response.json()
            return body if rows is None else self._parse(body, rows, k)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError, _Retryable) as e:
            return _Again(0, f"malformed response ({type(e).__name__}: {e})")

    def _parse(self, body, rows, k):
        """Per row: (log-prob of token j for every j, top entries per j), or _Retryable."""
        if self.api == "sglang":
            items = body if isinstance(body, list) else [body]
            if len(items) != len(rows):
                raise _Retryable(f"{len(items)} results for {len(rows)} sequences")
            return [_parse_sglang(item, ids, k) for item, ids in zip(items, rows, strict=True)]
        choices = body.get("choices") if isinstance(body, dict) else None
        if not isinstance(choices, list) or len(choices) != len(rows):
            got = len(choices) if isinstance(choices, list) else "no"
            raise _Retryable(f"{got} choices for {len(rows)} sequences")
        by_index = {c.get("index", i): c for i, c in enumerate(choices)}
        if sorted(by_index) != list(range(len(rows))):
            raise _Retryable("choice indices do not match the prompts")
        return [
            _parse_vllm(by_index[i].get("prompt_logprobs"), ids, k) for i, ids in enumerate(rows)
        ]


def _parse_vllm(entries, ids, k):
    if not isinstance(entries, list) or len(entries) != len(ids):
        n = len(entries) if isinstance(entries, list) else "no"
        raise _Retryable(f"{n} prompt log-probs for {len(ids)} tokens")
    lps, tops = [0.0], [[]]
    for j in range(1, len(ids)):
        entry = entries[j]
        if not isinstance(entry, dict) or str(ids[j]) not in entry:
            raise _Retryable(f"position {j} lacks the log-prob of token {ids[j]}")
        lps.append(_logprob(entry[str(ids[j])]))
        if k:
            ranked = sorted(((int(t), _logprob(v)) for t, v in entry.items()), key=lambda e: -e[1])
            tops.append(ranked)
    return lps, tops


def _parse_sglang(item, ids, k):
    meta = item.get("meta_info") if isinstance(item, dict) else None
    entries = meta.get("input_token_logprobs") if isinstance(meta, dict) else None
    if not isinstance(entries, list) or len(entries) != len(ids):
        n = len(entries) if isinstance(entries, list) else "no"
        raise _Retryable(f"{n} input log-probs for {len(ids)} tokens")
    lps, tops = [0.0], [[]]
    top_all = meta.get("input_top_logprobs") if k else None
    for j in range(1, len(ids)):
        lp, tid = entries[j][0], entries[j][1]
        if tid != ids[j]:
            raise _Retryable(f"position {j} scored token {tid}, not {ids[j]}")
        lps.append(_logprob(lp))
        if k:
            top = top_all[j] if isinstance(top_all, list) and len(top_all) > j else None
            if not isinstance(top, list):
                raise _Retryable(f"position {j} lacks top log-probs")
            entries_j = {int(e[1]): _logprob(e[0]) for e in top}
            entries_j.setdefault(ids[j], lps[-1])
            tops.append(sorted(entries_j.items(), key=lambda e: -e[1]))
    return lps, tops


def _logprob(value) -> float:
    lp = value.get("logprob") if isinstance(value, dict) else value
    if not isinstance(lp, (int, float)) or isinstance(lp, bool) or math.isnan(lp) or lp > 1e-4:
        raise _Retryable(f"log-prob {lp!r} is not a number <= 0")
    return max(float(lp), LOGP_FLOOR)  # -inf (a masked token) would make the advantage infinite


def _detail(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text.strip().splitlines()[0][:200] if response.text.strip() else ""
    if isinstance(body, dict):
        err = body.get("error", body.get("detail", body.get("message", body)))
        if isinstance(err, dict):
            err = err.get("message", err)
        return str(err).splitlines()[0][:300]
    return str(body)[:300]


def _retry_after(response: httpx.Response, cap: float) -> float | None:
    """Seconds a 429/503 asks us to wait (delay-seconds or an HTTP date), at most `cap` so that a
    confused server cannot park the run; None when it does not say."""
    value = response.headers.get("Retry-After", "").strip()
    if response.status_code not in (429, 503) or not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:  # "-0000": UTC
            when = when.replace(tzinfo=timezone.utc)
        seconds = (when - datetime.now(timezone.utc)).total_seconds()
    return min(max(seconds, 0.0), cap) if math.isfinite(seconds) else None


def _client_error(url: str, response: httpx.Response, k: int) -> str:
    code, detail = response.status_code, _detail(response)
    hint = ""
    if code in (401, 403):
        hint = " (check model.teacher_api_key)"
    elif code == 404:
        hint = " (the URL should be the server's OpenAI base, e.g. http://host:8000/v1)"
    elif "logprob" in detail.lower() and k:
        hint = f" (objective.topk={k}: the server may cap it; vLLM: raise --max-logprobs)"
    elif "logprob" in detail.lower():
        hint = " (the server cannot return prompt log-probs)"
    return f"teacher {url}: HTTP {code}: {detail}{hint}"


def first_real_column(attention_mask_BT: torch.Tensor) -> torch.Tensor:
    """(B,) the column of each row's first real token (left padding skipped)."""
    return (attention_mask_BT.cpu() == 0).long().cumprod(-1).sum(-1)


def row_tokens(rollouts: Rollouts) -> list[list[int]]:
    """Each row's real token ids: prompt and completion, without left or right padding."""
    tokens, attn = rollouts.tokens_BT.cpu(), rollouts.attention_mask_BT.cpu().bool()
    return [tokens[b][attn[b]].tolist() for b in range(tokens.shape[0])]
