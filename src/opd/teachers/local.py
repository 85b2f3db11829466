"""In-process teacher: a Hugging Face model on the same machine, scored under inference_mode."""

from __future__ import annotations

import torch

from opd.scoring import completion_logprobs
from opd.types import Rollouts


class LocalTeacher:
    def __init__(self, model, vocab_size: int, micro_batch_size: int = 0):
        self.model = model.eval()
        self.vocab_size = vocab_size
        self.micro_batch_size = micro_batch_size

    def score(self, rollouts: Rollouts) -> torch.Tensor:
        with torch.inference_mode():
            lp_BT = self._score(rollouts)
        return lp_BT.clone()  # a plain tensor: it enters the loss as a constant

    def _score(self, rollouts: Rollouts) -> torch.Tensor:
        device = next(self.model.parameters()).device
        step = self.micro_batch_size or rollouts.num_rows
        parts = []
        for start in range(0, rollouts.num_rows, step):
            mb = rollouts.slice(start, start + step)
            lp_BT = completion_logprobs(
                self.model,
                mb.tokens_BT.to(device),
                mb.attention_mask_BT.to(device),
                rollouts.prompt_len,
                self.vocab_size,
            )
            parts.append(lp_BT.float())
        lp_BT = torch.cat(parts)
        return torch.where(rollouts.completion_mask_BT.to(lp_BT.device), lp_BT, 0.0)
