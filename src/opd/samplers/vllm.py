"""Sampling on vLLM engines over HTTP, following the learner's weights.

`VLLMSampler.sample` sends each prompt's token ids to an engine's /v1/completions, one request
per prompt (all in flight at once), with `n` = group size, the run's temperature / top-p /
top-k, `logprobs: 0` and `return_token_ids`, and a seed per prompt drawn from the step's
generator (vLLM seeds each request's own generator, so what a request draws does not depend on
what else the engine runs; prompts batched into one request would share one seed's draws).
The answer's token ids and the log-prob of each sampled token become the same `Rollouts` as
the in-process samplers'; nothing is re-tokenised. The engine must report the log-probs of the distribution it sampled from:
engines opd starts run with `--logprobs-mode processed_logprobs` (temperature, top-p and top-k
applied); for engines given by URL that is the user's to set (at temperature 1 with no top-p /
top-k the raw and processed log-probs are the same).

An engine that serves the teacher (SFT on the teacher's samples, `follow=False`) is only checked
by the probe before its first sample; nothing is sent to it. Otherwise `sync` brings the engine
to the student's current weights: the weights are written as one safetensors file to
`sync_dir` (on /dev/shm when it exists) and each engine reloads them in place (`POST
/collective_rpc` with vLLM's worker method `reload_weights`; vLLM serves that call with
VLLM_SERVER_DEV_MODE=1, which opd sets for the engines it starts). After each sync a probe
sequence is scored by every engine and by the student: an engine whose log-probs differ by more
than `probe_tol` still serves other weights, which stops the run (a stale engine is never
silent).
"""

from __future__ import annotations

import shlex
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import torch

from opd.data import Prompt, pack
from opd.errors import OpdError
from opd.logprobs import completion_logprobs
from opd.types import Rollouts

# What a sampling engine must run with (the engines opd starts; the benchmarks' and tests' too):
# log-probs of the distribution sampled, no sampling defaults from the model folder, no prefix
# cache (it would hold keys and values of old weights), and /collective_rpc for the reload.
ENGINE_ARGS = ("--logprobs-mode", "processed_logprobs", "--no-enable-prefix-caching",
               "--generation-config", "vllm")  # fmt: skip
ENGINE_ENV = {"VLLM_SERVER_DEV_MODE": "1"}


class VLLMSampler:
    def __init__(
        self,
        model,
        urls: list[str],
        name: str,
        pad_id: int,
        stop_ids: list[int],
        vocab_size: int,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        probe_tol: float = 1e-3,
        timeout: float = 600.0,
        follow: bool = True,
    ):
        self.model = model  # the weights the engines must serve: the student's, or the teacher's
        self.follow = follow  # False: a fixed teacher, checked once and never sent weights
        self.urls = [u.rstrip("/") for u in urls]
        self.name = name
        self.pad_id, self.stop_ids, self.vocab_size = pad_id, stop_ids, vocab_size
        self.max_new_tokens = max_new_tokens
        self.temperature, self.top_p, self.top_k = temperature, top_p, top_k
        self.probe_tol = probe_tol
        self.client = httpx.Client(timeout=timeout)
        # a request per prompt, all in flight at once (each engine batches what it is sent)
        self.pool = ThreadPoolExecutor(64, thread_name_prefix="opd-vllm")
        root = Path("/dev/shm") if Path("/dev/shm").is_dir() else None
        self.sync_dir = Path(tempfile.mkdtemp(prefix="opd-sync-", dir=root))
        self.synced = False
        self.probe_ids: list[int] | None = None
        self.stack = None  # the engine opd started, if any (an ExitStack), stopped by close()
        self.lora = hasattr(model, "peft_config")  # a peft model: adapters, not whole weights
        self.base_name, self.version = name, 0

    # -- sampling ------------------------------------------------------------------------------

    def sample(
        self, prompts_P: list[Prompt], group_size: int, generator: torch.Generator
    ) -> Rollouts:
        if not self.synced:  # the first step (and the first after a resume): the model's weights
            self.probe_ids = prompts_P[0].ids[:32] + [self.stop_ids[0]]
            self.sync()
        # One request per prompt, each with its own seed: vLLM seeds a request's generator, so
        # the prompts of one request would share their random draws (the k-th sample of every
        # prompt drawing the same uniforms, their slips correlated across the batch).
        seeds = torch.randint(0, 2**31 - 1, (len(prompts_P),), generator=generator,
                              device=generator.device).tolist()  # fmt: skip
        jobs = [
            self.pool.submit(
                self._request, self.urls[i % len(self.urls)], prompt.ids, group_size, seeds[i]
            )  # fmt: skip
            for i, prompt in enumerate(prompts_P)
        ]
        prompts, completions, lps = [], [], []
        for job, prompt in zip(jobs, prompts_P, strict=True):
            for ids, lp in job.result():
                prompts.append(prompt.ids)
                completions.append(ids)
                lps.append(lp)
        tokens_BT, attention_BT, completion_BT, P = pack(prompts, completions, self.pad_id)
        sampler_lp_BT = torch.zeros(tokens_BT.shape)
        for b, lp in enumerate(lps):
            sampler_lp_BT[b, P : P + len(lp)] = torch.tensor(lp)
        return Rollouts(
            tokens_BT=tokens_BT,
            attention_mask_BT=attention_BT,
            completion_mask_BT=completion_BT,
            prompt_len=P,
            sampler_lp_BT=sampler_lp_BT,
            prompt_index_B=torch.arange(len(prompts_P)).repeat_interleave(group_size),
        )

    def _request(self, url: str, prompt: list[int], n: int, seed: int):
        """n (completion ids, their log-probs) of one prompt."""
        payload = {
            "model": self.name, "prompt": [prompt], "n": n, "max_tokens": self.max_new_tokens,
            "temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k or -1,
            "repetition_penalty": 1.0, "logprobs": 0, "return_token_ids": True, "seed": seed,
            "stop_token_ids": self.stop_ids, "skip_special_tokens": False,
        }  # fmt: skip
        body = self._post(f"{url}/completions", payload, "sampling")
        choices = sorted(body["choices"], key=lambda c: c["index"])
        if len(choices) != n:
            raise OpdError(f"engine {url}: {len(choices)} completions for one prompt x {n}")
        group = []
        for c in choices:
            ids, lp = list(c["token_ids"]), list(c["logprobs"]["token_logprobs"])
            if not ids or len(lp) != len(ids):
                raise OpdError(f"engine {url}: a completion without token ids or log-probs")
            if max(ids) >= self.vocab_size:
                raise OpdError(
                    f"engine {url} sampled token id {max(ids)}, outside the student's "
                    f"{self.vocab_size}-token vocabulary (an embedding row past the tokenizer)"
                )
            group.append((ids, lp))
        return group

    def _post(self, url: str, payload: dict, what: str) -> dict:
        try:
            response = self.client.post(url, json=payload)
        except httpx.HTTPError as e:
            raise OpdError(f"engine {url}: {what} failed ({type(e).__name__}: {e})") from None
        if response.status_code != 200:
            detail = response.text.strip().splitlines()[0][:300] if response.text.strip() else ""
            raise OpdError(f"engine {url}: {what}: HTTP {response.status_code}: {detail}")
        try:
            return response.json()
        except ValueError:  # vLLM answers some calls in plain text ("Success: ...")
            return {}

    # -- following the learner ------------------------------------------------------------------

    def sync(self) -> dict:
        """Every engine to the student's weights now, checked by the probe; the seconds it took.
        A LoRA student's adapters are loaded as a new adapter (vLLM's runtime LoRA loading) and
        the previous one unloaded; a fully trained student's weights are reloaded in place. An
        engine serving a fixed teacher is only probed, before its first sample."""
        if not self.follow:
            if self.synced:
                return {}
            self.synced = True
            return {"sampler/probe_gap": self.probe()}
        t0 = time.perf_counter()
        if self.lora:
            self._sync_adapter()
        else:
            self._sync_weights()
        write_s = time.perf_counter() - t0
        gap = self.probe()
        self.synced = True
        return {"sampler/sync_s": time.perf_counter() - t0, "sampler/sync_write_s": write_s,
                "sampler/probe_gap": gap}  # fmt: skip

    def _sync_weights(self) -> None:
        from safetensors.torch import save_file

        state = {k: v.detach().contiguous().cpu() for k, v in self.model.state_dict().items()}
        tmp = self.sync_dir / "model.safetensors.tmp"
        save_file(state, str(tmp))
        tmp.replace(self.sync_dir / "model.safetensors")
        for url in self.urls:
            root = url.removesuffix("/v1")
            self._post(
                f"{root}/collective_rpc",
                {"method": "reload_weights", "kwargs": {"weights_path": str(self.sync_dir)}},
                "reloading weights (vLLM serves /collective_rpc with VLLM_SERVER_DEV_MODE=1)",
            )

    def _sync_adapter(self) -> None:
        self.version += 1
        name, folder = f"opd-student-{self.version}", self.sync_dir / f"adapter-{self.version}"
        self.model.save_pretrained(str(folder))  # peft: adapter_model.safetensors + its config
        previous, self.name = self.name, name
        for url in self.urls:
            self._post(f"{url}/load_lora_adapter", {"lora_name": name, "lora_path": str(folder)},
                       "loading the adapter (vLLM: --enable-lora, "
                       "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True)")  # fmt: skip
            if previous != self.base_name:
                self._post(f"{url}/unload_lora_adapter", {"lora_name": previous},
                           "unloading the previous adapter")  # fmt: skip
        if self.version > 1:
            shutil.rmtree(self.sync_dir / f"adapter-{self.version - 1}", ignore_errors=True)

    def probe(self) -> float:
        """Max |engine - student| log-prob over the probe sequence on every engine; an OpdError
        past probe_tol."""
        ids = self.probe_ids
        with torch.no_grad():
            device = next(self.model.parameters()).device
            tokens = torch.tensor([ids], device=device)
            want = (
                completion_logprobs(
                    self.model, tokens, torch.ones_like(tokens), 1, self.vocab_size
                )[0, 1:]
                .float()
                .cpu()
            )
        worst = 0.0
        for url in self.urls:
            body = self._post(
                f"{url}/completions",
                {"model": self.name, "prompt": [ids], "max_tokens": 1, "prompt_logprobs": 0},
                "scoring the probe",
            )
            entries = body["choices"][0]["prompt_logprobs"]
            got = torch.tensor([entries[j][str(ids[j])]["logprob"] for j in range(1, len(ids))])
            gap = float((got - want).abs().max())
            if not gap <= self.probe_tol:
                what = "student's weights after the sync" if self.follow else "teacher's weights"
                raise OpdError(
                    f"engine {url} does not serve the {what}: a probe log-prob differs by "
                    f"{gap:.2e} (more than {self.probe_tol:g}); a stale engine would sample from "
                    "another policy"
                )
            worst = max(worst, gap)
        return worst

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.client.close()
        shutil.rmtree(self.sync_dir, ignore_errors=True)
        if self.stack is not None:
            self.stack.close()


def engine_urls(text: str) -> list[str]:
    """sampling.urls as a list ('' gives none: opd starts the engine)."""
    return [u.strip() for u in text.split(",") if u.strip()]


def start_vllm_sampler(cfg, model, tokenizer, vocab_size: int, stop_ids, max_len: int,
                       teacher: bool = False, rank: int = 0, world: int = 1):  # fmt: skip
    """The VLLMSampler of a run (of rank `rank` of `world`): on its share of sampling.urls
    (URLs rank, rank + world, ...), or on an engine opd starts now from the student's folder
    (the teacher's with `teacher`: SFT on its samples), stopped by `close`; `model` is the one
    the engine must serve, `max_len` the longest row (prompt + completion)."""
    from contextlib import ExitStack

    from opd.engine import leave_cores, parse_cpus, serve_vllm

    s = cfg.sampling
    stack = ExitStack()
    urls = engine_urls(s.urls)[rank::world]
    name = "teacher" if teacher else "student"
    dtype = cfg.model.teacher_dtype if teacher else cfg.model.dtype
    if not urls:
        log = Path(tempfile.mkstemp(prefix="opd-vllm-", suffix=".log")[1])
        whose = f" of rank {rank}" if world > 1 else ""
        print(f"opd: starting a vLLM engine{whose} for sampling (log {log})", file=sys.stderr)
        args, env = [*ENGINE_ARGS, "--seed", str(cfg.run.seed)], dict(ENGINE_ENV)
        if cfg.model.lora_rank > 0 and not teacher:  # adapters loaded at run time, every step
            args += ["--enable-lora", "--max-lora-rank", str(lora_rank_for(cfg.model.lora_rank))]
            env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
        try:  # the user's own `vllm serve` arguments last, so they win
            args += shlex.split(s.engine_args)
        except ValueError as e:
            raise OpdError(f"sampling.engine_args={s.engine_args!r}: {e}") from None
        folder = cfg.model.teacher if teacher else cfg.model.student
        urls = [stack.enter_context(serve_vllm(
            folder, name=name, max_model_len=max_len, dtype=dtype,
            log_path=log, extra_args=args, env_extra=env, cpus=s.engine_cpus,
        ))]  # fmt: skip
        if s.engine_cpus:  # the learner moves to the other cores
            left = leave_cores(parse_cpus(s.engine_cpus))
            if cfg.run.threads == 0 and next(model.parameters()).device.type == "cpu":
                torch.set_num_threads(left)
    else:
        name = served_name(urls[0])
    sampler = VLLMSampler(
        model, urls, name, tokenizer.pad_token_id, stop_ids, vocab_size, s.max_new_tokens,
        s.temperature, s.top_p, s.top_k, probe_tol=1e-3 if dtype == "float32" else 5e-2,
        follow=not teacher,
    )  # fmt: skip
    sampler.stack = stack
    return sampler


def lora_rank_for(rank: int) -> int:
    """The smallest of vLLM's allowed --max-lora-rank values that holds `rank`."""
    return next((r for r in (8, 16, 32, 64, 128, 256, 320, 512) if r >= rank), rank)


def served_name(url: str) -> str:
    try:
        body = httpx.get(url.rstrip("/") + "/models", timeout=30).json()
        return body["data"][0]["id"]
    except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError) as e:
        raise OpdError(f"engine {url}: cannot list its model ({type(e).__name__}: {e})") from None
