"""Any sampler under torch.autocast (run.autocast=bfloat16): bf16 matrix multiplies while decoding.

The recorded log-probs are those of the distribution actually sampled from (computed in float32
from the autocast logits), so the importance ratio in the loss corrects the rounding gap
between the bf16 sampler and the trainer's weights-dtype forward, as it does for vLLM.
"""

from __future__ import annotations

import torch

from opd.data import Prompt
from opd.types import Rollouts, autocast_context


class AutocastSampler:
    def __init__(self, sampler, device: torch.device, autocast: str):
        self.sampler, self.device, self.autocast = sampler, device, autocast

    def sample(
        self, prompts_P: list[Prompt], group_size: int, generator: torch.Generator
    ) -> Rollouts:
        with autocast_context(self.device, self.autocast):
            return self.sampler.sample(prompts_P, group_size, generator)
