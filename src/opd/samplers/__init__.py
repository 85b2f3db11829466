"""Samplers turn prompts into rollouts and record the sampler's log-prob of every sampled token.

A backend is any object with this `sample` method; `make_sampler` picks one. Faster decoders
(a preallocated KV cache, vLLM) are new classes here and one line in the factory.
"""

from __future__ import annotations

from typing import Protocol

import torch

from opd.data import Prompt
from opd.types import Rollouts


class Sampler(Protocol):
    def sample(
        self, prompts_P: list[Prompt], group_size: int, generator: torch.Generator
    ) -> Rollouts:
        """`group_size` completions per prompt (rows grouped by prompt, prompt-major)."""
        ...


def make_sampler(
    model,
    tokenizer,
    vocab_size: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
) -> Sampler:
    from opd.models import stop_token_ids
    from opd.samplers.hf import HFSampler

    return HFSampler(
        model,
        pad_id=tokenizer.pad_token_id,
        stop_ids=stop_token_ids(tokenizer, model),
        vocab_size=vocab_size,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
    )
