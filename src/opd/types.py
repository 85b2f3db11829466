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
from dataclasses import dataclass, replace

import torch

# A teacher log-prob of -inf (a served teacher's hard mask) would make a KL or an advantage
# infinite; below this a float32 probability is denormal anyway, so the floor changes no
# realistic value.
LOGP_FLOOR = -100.0


@dataclass
class Rollouts:
    tokens_BT: torch.Tensor  # long
    attention_mask_BT: torch.Tensor  # long, 1 = real token
    completion_mask_BT: torch.Tensor  # bool, True = sampled token (trained on)
    prompt_len: int  # completions start at this column
    sampler_lp_BT: torch.Tensor  # float32, log-prob of each sampled token under the sampler
    prompt_index_B: torch.Tensor  # long, which prompt of the step each row came from
    teacher_lp_BT: torch.Tensor | None = None
    advantages_BT: torch.Tensor | None = None

    @property
    def num_rows(self) -> int:
        return self.tokens_BT.shape[0]

    @property
    def num_completion_tokens(self) -> int:
        return int(self.completion_mask_BT.sum())

    def slice(self, start: int, stop: int) -> Rollouts:
        """Rows [start, stop) as a new batch (for micro-batching)."""
        return self._rows(lambda t: t[start:stop])

    def select(self, rows_B: torch.Tensor) -> Rollouts:
        """The rows at these indices as a new batch (for routing rows to teachers)."""
        return self._rows(lambda t: t[rows_B.to(t.device)])

    def _rows(self, cut_rows) -> Rollouts:
        def cut(t):
            return None if t is None else cut_rows(t)

        return replace(
            self,
            tokens_BT=cut(self.tokens_BT),
            attention_mask_BT=cut(self.attention_mask_BT),
            completion_mask_BT=cut(self.completion_mask_BT),
            sampler_lp_BT=cut(self.sampler_lp_BT),
            prompt_index_B=cut(self.prompt_index_B),
            teacher_lp_BT=cut(self.teacher_lp_BT),
            advantages_BT=cut(self.advantages_BT),
        )


def position_ids(attention_mask_BT: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding: the first real token of every row is position 0."""
    return (attention_mask_BT.long().cumsum(-1) - 1).clamp(min=0)


def autocast_context(device: torch.device, autocast: str):
    """torch.autocast to bfloat16 for run.autocast='bfloat16', else a no-op context."""
    if autocast == "none":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=getattr(torch, autocast))
