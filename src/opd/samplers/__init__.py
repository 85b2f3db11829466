"""Samplers turn prompts into rollouts and record the sampler's log-prob of every sampled token.

A backend is any object with this `sample` method; `make_sampler` picks one: `KVCacheSampler`
(fast/decode.py, a preallocated KV cache for Llama/Qwen2/Qwen3/Mistral) where the model allows
it and the fast paths are on, else `HFSampler` (hf.py, any causal LM). `DatasetSampler`
(dataset.py) replays the rows' own completions. `VLLMSampler` (vllm.py) samples on vLLM engines
that follow the student's weights, through `Prefetch` (prefetch.py), built by build.py for
sampling.backend=vllm; `make_sampler` gives evaluation and checks an in-process one.
"""

from __future__ import annotations

from typing import Protocol

import torch

from opd.data import Prompt
from opd.errors import OpdError
from opd.types import Rollouts


class Sampler(Protocol):
    def sample(
        self, prompts_P: list[Prompt], group_size: int, generator: torch.Generator
    ) -> Rollouts:
        """`group_size` completions per prompt (rows grouped by prompt, prompt-major)."""
        ...


BACKENDS = ("auto", "kv", "hf")


def make_sampler(
    model,
    tokenizer,
    vocab_size: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    backend: str = "auto",
    fast: bool = True,
) -> Sampler:
    """backend 'kv' (KVCacheSampler), 'hf' (HFSampler) or 'auto': kv where the model allows it
    and `fast` (run.fast_paths) is on."""
    from opd.fast.decode import KVCacheSampler
    from opd.fast.llama import kv_supported
    from opd.models import stop_token_ids
    from opd.samplers.hf import HFSampler

    if backend == "vllm":  # a run's engine samples for training; evaluation and checks here
        backend = "auto"
    if backend not in BACKENDS:
        raise OpdError(f"sampling.backend={backend!r}: must be 'auto', 'kv' or 'hf'")
    if backend == "kv" and not fast:
        raise OpdError("sampling.backend=kv is a fast path: it needs run.fast_paths=true")
    if not fast:
        backend = "hf"
    reason = kv_supported(model) if backend != "hf" else None
    if backend == "kv" and reason is not None:
        raise OpdError(f"sampling.backend=kv does not support this model: {reason}")
    cls = KVCacheSampler if backend != "hf" and reason is None else HFSampler
    return cls(
        model,
        pad_id=tokenizer.pad_token_id,
        stop_ids=stop_token_ids(tokenizer, model),
        vocab_size=vocab_size,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
    )
