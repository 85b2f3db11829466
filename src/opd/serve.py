"""`opd serve-teacher`: a teacher model behind vLLM's prompt-log-prob API, for any trainer.

The subset served (enough for `opd distill --teacher http://HOST:PORT/v1` and for other
projects that score with vLLM):
- POST /v1/completions with `prompt` = token ids (one list, or a list of lists), `max_tokens`
  0 or 1 and `prompt_logprobs` = k: each choice's `prompt_logprobs` is `null` for the first
  token, then {"<id>": {"logprob", "rank", "decoded_token"}} with the actual token and the top-k;
- POST /tokenize ({"model", "prompt", "add_special_tokens"} -> {"tokens", "count", ...}) and
  POST /detokenize ({"model", "tokens"} -> {"prompt"}), at the root as vLLM has them, so that a
  trainer can check this tokenizer against its own; GET /tokenizer_info adds its size and a hash
  (`opd_len`, `opd_sha256`);
- POST /v1/opd/vocab_logprobs (opd's own; vLLM has no such call) with `prompt` = rows of ids,
  `positions` = per row the j whose p(. | x_<j) is wanted, `token_ids` = null (the whole
  vocabulary) or the ids wanted at each: float32 log-probs, zlib-compressed, shape in the
  X-Opd-Shape header; what `objective.loss=full|jsd` read from a served teacher;
- GET /v1/models and GET /health.
Requests that arrive together are scored in one forward pass. Loopback only unless --host says
otherwise; an optional bearer key; limits on rows, length and k answer 4xx with the reason, and so
do a body over --max-body (413) and JSON nested too deep (400, serve_limits.py); past
--max-queue scoring requests waiting, a 429 with Retry-After.
"""

import asyncio
import contextlib
import math
import time
import uuid
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from opd.errors import OpdError
from opd.models import load_model, load_tokenizer
from opd.serve_limits import (
    bind,
    check_completions,
    check_detokenize,
    check_tokenize,
    check_vocab_logprobs,
    default_max_body,
    one_line,
    read_json,
)
from opd.teachers.tokenizer_check import tokenizer_sha256

LOGITS_BUDGET = 2**25  # floats of (rows x tokens x vocab) logits held at once
MAX_VOCAB_FLOATS = 2**26  # log-probs in one /v1/opd/vocab_logprobs answer (256 MB of float32)


@dataclass
class _Job:
    rows: list[list[int]]
    k: int
    future: asyncio.Future


class TeacherScorer:
    """Scores token-id sequences with a local model (one forward per batch of rows)."""

    def __init__(self, model, tokenizer):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.vocab = len(tokenizer)
        self.max_len = getattr(model.config, "max_position_embeddings", None) or 2**31
        self.device = next(model.parameters()).device

    @torch.inference_mode()
    def score(self, rows: list[list[int]], ks: list[int]) -> list[tuple[list, int]]:
        """Per row: (prompt_logprobs entries, argmax next token)."""
        out = []
        longest = max(len(r) for r in rows)
        step = max(1, LOGITS_BUDGET // max(longest * self.vocab, 1))
        for start in range(0, len(rows), step):
            part = rows[start : start + step]
            out += self._score_part(part, ks[start : start + step])
        return out

    def _score_part(self, rows, ks):
        logits_BTV = self._logits(rows)
        results = []
        for b, (r, k) in enumerate(zip(rows, ks, strict=True)):
            lp_TV = torch.log_softmax(logits_BTV[b, : len(r), : self.vocab].float(), dim=-1)
            results.append((self._entries(lp_TV, r, k), int(lp_TV[-1].argmax())))
        return results

    @torch.inference_mode()
    def vocab_logprobs(self, rows, positions, wanted) -> torch.Tensor:
        """(N, V) float32 log p(. | row[:j]) at every requested position j of every row, in
        order, or (N, K) of the ids asked for at each position (`wanted`, else None)."""
        out = []
        K = next((len(ids[0]) for ids in wanted if ids), 0) if wanted is not None else self.vocab
        step = max(1, LOGITS_BUDGET // max(max(len(r) for r in rows) * self.vocab, 1))
        for start in range(0, len(rows), step):
            part = rows[start : start + step]
            logits_BTV = self._logits(part)
            for b in range(len(part)):
                i = start + b
                at = torch.tensor(positions[i], dtype=torch.long, device=self.device) - 1
                lp_nV = torch.log_softmax(logits_BTV[b, at, : self.vocab].float(), dim=-1)
                if wanted is not None:  # (n, K) ids, as many at every position (checked)
                    ids = torch.tensor(wanted[i], dtype=torch.long, device=self.device)
                    lp_nV = lp_nV.gather(-1, ids.reshape(len(positions[i]), K))
                out.append(lp_nV.cpu())
        return torch.cat(out)

    def _logits(self, rows: list[list[int]]) -> torch.Tensor:
        """(B, T, V') logits of the rows, right-padded (positions from 0 in every row)."""
        T = max(len(r) for r in rows)
        ids_BT = torch.zeros(len(rows), T, dtype=torch.long)
        mask_BT = torch.zeros(len(rows), T, dtype=torch.long)
        for b, r in enumerate(rows):
            ids_BT[b, : len(r)] = torch.tensor(r)
            mask_BT[b, : len(r)] = 1
        return self.model(
            input_ids=ids_BT.to(self.device),
            attention_mask=mask_BT.to(self.device),
            position_ids=torch.arange(T).expand(ids_BT.shape).to(self.device),
            use_cache=False,
        ).logits

    def _entries(self, lp_TV: torch.Tensor, ids: list[int], k: int) -> list:
        n = len(ids)
        target = torch.tensor(ids[1:], device=lp_TV.device)
        lp_prev = lp_TV[:-1]  # position j-1 predicts token j
        actual = lp_prev.gather(-1, target[:, None]).squeeze(-1)
        rank = (lp_prev > actual[:, None]).sum(-1) + 1
        k = min(k, lp_prev.shape[-1])  # a vocabulary smaller than k: all of it
        if k:
            top_lp, top_id = lp_prev.topk(k, dim=-1)
            top_lp, top_id = top_lp.tolist(), top_id.tolist()
        actual, rank = actual.tolist(), rank.tolist()
        entries = [None]
        for j in range(1, n):
            entry = {str(ids[j]): self._item(actual[j - 1], rank[j - 1], ids[j])}
            if k:
                for r, (tid, lp) in enumerate(
                    zip(top_id[j - 1], top_lp[j - 1], strict=True), start=1
                ):
                    entry.setdefault(str(tid), self._item(lp, r, tid))
            entries.append(entry)
        return entries

    def _item(self, lp: float, rank: int, tid: int) -> dict:
        return {"logprob": lp, "rank": rank, "decoded_token": self.tokenizer.decode([tid])}


def create_app(
    scorer: TeacherScorer,
    name: str = "teacher",
    api_key: str = "",
    max_logprobs: int = 20,
    max_rows: int = 256,
    max_batch_rows: int = 256,
    max_body: int | None = None,
    max_queue: int = 64,
):
    """The FastAPI app. max_body: bytes of a request body (default: what max_rows rows of the
    model's context need); max_queue: scoring requests read or waiting beyond the forward pass
    running, past which a request is answered 429 with Retry-After."""
    try:
        from fastapi import FastAPI, Request
        from fastapi.responses import JSONResponse, Response
    except ImportError:
        raise OpdError(
            "serve-teacher needs FastAPI and uvicorn: pip install 'opd[serve]'"
        ) from None

    queue: asyncio.Queue[_Job] = asyncio.Queue()  # bounded by `waiting` (max_queue)
    max_body = max_body or default_max_body(max_rows, scorer.max_len, scorer.vocab)
    waiting, forward_s = 0, 0.0  # requests admitted and not yet taken; the last forward's time
    sha256 = tokenizer_sha256(scorer.tokenizer)
    executor = ThreadPoolExecutor(1, thread_name_prefix="opd-score")  # one forward at a time

    def error(code: int, message: str, kind: str = "", headers: dict | None = None):
        kinds = {404: "NotFoundError", 413: "RequestTooLargeError", 429: "RateLimitError"}
        kind = kind or kinds.get(code, "BadRequestError")
        body = {"error": {"message": one_line(message), "type": kind, "param": None, "code": code}}
        return JSONResponse(body, status_code=code, headers=headers)

    async def batcher():
        nonlocal waiting, forward_s
        loop = asyncio.get_running_loop()
        while True:
            jobs = [await queue.get()]
            n = len(jobs[0].rows)
            while not queue.empty() and n < max_batch_rows:
                jobs.append(queue.get_nowait())
                n += len(jobs[-1].rows)
            waiting -= len(jobs)
            rows = [r for j in jobs for r in j.rows]
            ks = [j.k for j in jobs for _ in j.rows]
            start = time.monotonic()
            try:
                scored = await loop.run_in_executor(executor, scorer.score, rows, ks)
                forward_s = time.monotonic() - start
            except Exception as e:  # a bug or out of memory: every waiting request hears of it
                for j in jobs:
                    if not j.future.done():
                        j.future.set_exception(e)
                continue
            at = 0
            for j in jobs:
                if not j.future.done():
                    j.future.set_result(scored[at : at + len(j.rows)])
                at += len(j.rows)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        task = asyncio.create_task(batcher())
        yield
        task.cancel()
        executor.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="opd teacher", docs_url=None, redoc_url=None, lifespan=lifespan)

    @app.middleware("http")
    async def check_key(request: Request, call_next):
        if api_key and request.url.path != "/health":
            if request.headers.get("authorization", "") != f"Bearer {api_key}":
                return error(
                    401,
                    "missing or wrong API key (Authorization: Bearer ...)",
                    "AuthenticationError",
                )
        return await call_next(request)

    @app.get("/health")
    async def health():
        return {}

    @app.get("/v1/models")
    async def models():
        card = {
            "id": name,
            "object": "model",
            "created": int(time.time()),
            "owned_by": "opd",
            "max_model_len": scorer.max_len,
        }
        return {"object": "list", "data": [card]}

    @app.post("/tokenize")
    async def tokenize(request: Request):
        body = await read_json(request, max_body)
        problem = check_tokenize(body, name)
        if problem:
            return error(*problem)
        tok, special = scorer.tokenizer, body.get("add_special_tokens", True)
        ids = tok.encode(body["prompt"], add_special_tokens=special)
        strs = tok.convert_ids_to_tokens(ids) if body.get("return_token_strs") else None
        n = len(ids)
        return {"count": n, "max_model_len": scorer.max_len, "tokens": ids, "token_strs": strs}

    @app.post("/detokenize")
    async def detokenize(request: Request):
        body = await read_json(request, max_body)
        problem = check_detokenize(body, name, scorer.vocab)
        if problem:
            return error(*problem)
        return {"prompt": scorer.tokenizer.decode(body["tokens"])}

    @app.get("/tokenizer_info")
    async def tokenizer_info():
        tok = scorer.tokenizer
        return {"tokenizer_class": type(tok).__name__, "opd_len": len(tok), "opd_sha256": sha256}

    def full_queue():
        """A 429 past --max-queue waiting requests (before the body is read: a full queue
        holds the memory), else None."""
        if waiting < max_queue:
            return None
        after = max(1, math.ceil(forward_s * (1 + waiting / max(max_queue, 1))))
        message = f"{waiting} requests are waiting (--max-queue={max_queue}); retry later"
        return error(429, message, headers={"Retry-After": str(min(after, 60))})

    @app.post("/v1/opd/vocab_logprobs")
    async def vocab_logprobs(request: Request):
        """opd's own: log-probs over the whole vocabulary (or of the ids asked for) at the
        positions asked for, as float32 bytes (zlib), for the full-vocabulary losses."""
        nonlocal waiting
        if busy := full_queue():
            return busy
        waiting += 1
        try:
            body = await read_json(request, max_body)
            problem = check_vocab_logprobs(body, name, scorer, max_rows, MAX_VOCAB_FLOATS)
            if problem:
                return error(*problem)
            args = (body["prompt"], body["positions"], body.get("token_ids"))
            lp_NK = await asyncio.get_running_loop().run_in_executor(
                executor, scorer.vocab_logprobs, *args
            )
        finally:
            waiting -= 1
        data = zlib.compress(lp_NK.numpy().astype("<f4").tobytes(), 1)
        shape = ",".join(map(str, lp_NK.shape))
        headers = {"X-Opd-Shape": shape, "X-Opd-Encoding": "zlib-f32le"}
        return Response(data, media_type="application/octet-stream", headers=headers)

    @app.post("/v1/completions")
    async def completions(request: Request):
        nonlocal waiting
        if busy := full_queue():
            return busy
        waiting += 1
        queued = False
        try:
            body = await read_json(request, max_body)
            problem = check_completions(body, name, scorer, max_logprobs, max_rows)
            if problem:
                return error(*problem)
            prompt = body["prompt"]
            rows = [prompt] if prompt and isinstance(prompt[0], int) else prompt
            k = int(body["prompt_logprobs"])
            future = asyncio.get_running_loop().create_future()
            queue.put_nowait(_Job(rows, k, future))
            queued = True  # the batcher counts it out of `waiting` when it takes it
        finally:
            if not queued:
                waiting -= 1
        scored = await future
        want_token = body.get("max_tokens", 1) != 0
        choices = [
            {
                "index": i,
                "text": scorer.tokenizer.decode([nxt]) if want_token else "",
                "logprobs": None,
                "finish_reason": "length",
                "stop_reason": None,
                "prompt_logprobs": entries,
            }
            for i, (entries, nxt) in enumerate(scored)
        ]
        n_prompt = sum(len(r) for r in rows)
        n_new = len(rows) if want_token else 0
        return {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": name,
            "choices": choices,
            "usage": {
                "prompt_tokens": n_prompt,
                "completion_tokens": n_new,
                "total_tokens": n_prompt + n_new,
            },
        }

    return app


def serve(
    model_dir: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    name: str = "teacher",
    api_key: str = "",
    max_logprobs: int = 20,
    max_rows: int = 256,
    dtype: str = "float32",
    device: str = "cpu",
    max_body: int | None = None,
    max_queue: int = 64,
) -> None:
    try:
        import uvicorn
    except ImportError:
        raise OpdError(
            "serve-teacher needs FastAPI and uvicorn: pip install 'opd[serve]'"
        ) from None
    sock = bind(host, port)  # a port in use or a bad host stops here, before the model loads
    try:
        tokenizer = load_tokenizer(model_dir, "serve-teacher")
        model = load_model(model_dir, dtype, device, "serve-teacher")
        scorer = TeacherScorer(model, tokenizer)
        app = create_app(
            scorer, name, api_key, max_logprobs, max_rows, max_body=max_body, max_queue=max_queue
        )
        max_body = max_body or default_max_body(max_rows, scorer.max_len, scorer.vocab)
        where = f"[{host}]" if ":" in host else host
        print(
            f"serving {model_dir} as {name!r} on http://{where}:{sock.getsockname()[1]}/v1 "
            f"(bodies up to {max_body} bytes, up to {max_queue} requests queued)",
            flush=True,
        )
        config = uvicorn.Config(app, host=host, port=port, log_level="warning")
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()
