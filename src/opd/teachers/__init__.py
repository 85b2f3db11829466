"""Teachers score sampled tokens: log p_teacher(x_t | prompt, x_<t) for every completion token.

A backend is any object with this `score` method; only the gathered log-probs leave it. Served
teachers (vLLM / SGLang / our own server) are new classes here and one line in the factory.
"""

from __future__ import annotations

from typing import Protocol

import torch

from opd.types import Rollouts


class Teacher(Protocol):
    def score(self, rollouts: Rollouts) -> torch.Tensor:
        """(B, T) teacher log-probs aligned with rollouts.tokens_BT (0 outside completions)."""
        ...


def make_teacher(model, vocab_size: int, micro_batch_size: int = 0) -> Teacher:
    from opd.teachers.local import LocalTeacher

    return LocalTeacher(model, vocab_size, micro_batch_size)
