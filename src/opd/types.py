"""The one batch type that flows from sampler to teacher to loss.

Axis suffixes: B rows (= P prompts x G samples), T tokens, V vocabulary.

Row layout in `tokens_BT`: the prompt is left-padded to a common length `prompt_len`, the
completion follows, then right padding:

    [pad pad p0 p1 p2 | c0 c1 c2 EOS pad pad]
                        ^ prompt_len

`attention_mask_BT` is 1 on prompt and completion tokens. `completion_mask_BT` is True on the
tokens the student sampled (EOS included), so a pad id equal to the EOS id never drops EOS from
the loss. Position ids are always derived from the attention mask (see `position_ids`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, fields, replace

import torch

# A teacher log-prob of -inf (a served teacher's hard mask) would make a KL or an advantage
# infinite; below this a float32 probability is denormal anyway, so the floor changes no
# realistic value.
LOGP_FLOOR = -100.0


# (rows_N, cols_N) -> the teacher's logits (N, V) for the tokens at tokens_BT[rows_N, cols_N],
# i.e. its next-token distribution given tokens_BT[rows_N, :cols_N] (an in-process teacher's
# output for the full-vocabulary losses; rows index the batch it is attached to)
TeacherLogits = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Rollouts:
    """A step's batch. The sampler fills the first six fields; the score step adds the teacher's
    and the rewards' fields, the advantages step `advantages_BT` (each a new Rollouts)."""

    tokens_BT: torch.Tensor  # long
    attention_mask_BT: torch.Tensor  # long, 1 = real token
    completion_mask_BT: torch.Tensor  # bool, True = sampled token (trained on)
    prompt_len: int  # completions start at this column
    sampler_lp_BT: torch.Tensor  # float32, log-prob of each sampled token under the sampler
    prompt_index_B: torch.Tensor  # long, which prompt of the step each row came from
    teacher_B: tuple[str, ...] | None = None  # the name of the teacher that scored each row
    teacher_lp_BT: torch.Tensor | None = None  # float32, teacher log-prob of each sampled token
    # the teacher's top-k at each completion position (+ the sampled token when outside them),
    # padded with id -1 / log-prob -inf: objective.loss=topk
    teacher_topk_ids_BTK: torch.Tensor | None = None
    teacher_topk_lp_BTK: torch.Tensor | None = None
    teacher_logits: TeacherLogits | None = None  # objective.loss=full|jsd
    rewards_B: torch.Tensor | None = None  # float32, the task reward of each row
    advantages_BT: torch.Tensor | None = None  # float32, per completion token
    # Rows an older policy sampled (sampling.staleness=1), whose k_t must be the trained
    # policy's: its log-prob of each sampled token (float32; the KL advantages read it), or,
    # when k_t enters A_t per token, stale_kl_coef: the loss moves A_t by -coef (lp_train -
    # lp_sampler) itself, from the log-probs its forward computes anyway.
    policy_lp_BT: torch.Tensor | None = None
    stale_kl_coef: float = 0.0

    @property
    def num_rows(self) -> int:
        return self.tokens_BT.shape[0]

    @property
    def num_completion_tokens(self) -> int:
        return int(self.completion_mask_BT.sum())

    def slice(self, start: int, stop: int) -> Rollouts:
        """Rows [start, stop) as a new batch (for micro-batching)."""
        return self.select(torch.arange(start, min(stop, self.num_rows)))

    def select(self, rows_B: torch.Tensor) -> Rollouts:
        """The rows at these indices as a new batch (micro-batches, routing rows to teachers)."""
        rows_B = rows_B.cpu()
        out = {
            f.name: value[rows_B.to(value.device)]
            for f in fields(self)
            if torch.is_tensor(value := getattr(self, f.name))
        }
        if self.teacher_B is not None:
            out["teacher_B"] = tuple(self.teacher_B[b] for b in rows_B.tolist())
        if self.teacher_logits is not None:
            logits = self.teacher_logits
            out["teacher_logits"] = lambda rows_N, cols_N: logits(rows_B[rows_N.cpu()], cols_N)
        return replace(self, **out)

    def to(self, device: torch.device) -> Rollouts:
        """The batch with every tensor on `device` (a no-op for those already there)."""
        moved = {
            f.name: value.to(device)
            for f in fields(self)
            if torch.is_tensor(value := getattr(self, f.name))
        }
        return replace(self, **moved)


def position_ids(attention_mask_BT: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding: the first real token of every row is position 0."""
    return (attention_mask_BT.long().cumsum(-1) - 1).clamp(min=0)


def autocast_context(device: torch.device, autocast: str):
    """torch.autocast to bfloat16 for run.autocast='bfloat16', else a no-op context."""
    if autocast == "none":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=getattr(torch, autocast))
