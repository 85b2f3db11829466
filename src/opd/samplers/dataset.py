"""A token source that replays the rows' own completions (SFT on data): nothing is sampled."""

from __future__ import annotations

import torch

from opd.data import Prompt, pack
from opd.types import Rollouts


class DatasetSampler:
    def __init__(self, pad_id: int, device: torch.device | str = "cpu"):
        self.pad_id = pad_id
        self.device = torch.device(device)

    def sample(
        self, prompts_P: list[Prompt], group_size: int, generator: torch.Generator
    ) -> Rollouts:
        """One row per prompt: copies of the same target would add cost, not signal."""
        tokens_BT, attention_BT, completion_BT, prompt_len = pack(
            [p.ids for p in prompts_P], [p.completion_ids for p in prompts_P], self.pad_id
        )
        batch = Rollouts(
            tokens_BT=tokens_BT,
            attention_mask_BT=attention_BT,
            completion_mask_BT=completion_BT,
            prompt_len=prompt_len,
            sampler_lp_BT=torch.zeros(tokens_BT.shape),  # not sampled: no sampler log-probs
            prompt_index_B=torch.arange(len(prompts_P)),
        )
        return batch.to(self.device)  # on the run's device, like every sampler's batch
