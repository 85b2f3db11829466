"""In-process teacher: a Hugging Face model on the same machine, scored under inference_mode."""

from __future__ import annotations

import torch

from opd.heads import plain_head, score_completions
from opd.packed import PackedLinears, call_module
from opd.scoring import completion_logprobs, completion_topk
from opd.teachers.shared_prompt import (
    contiguous_completions,
    score_shared_prompts,
    shared_prompt_supported,
)
from opd.types import Rollouts, autocast_context

# A teacher whose linear weights fit in this many bytes keeps a packed copy of them for the
# shared-prompt pass (packed.py): 1.2-1.4x faster multiplies on a CPU for twice the memory.
PACK_TEACHER_MAX_BYTES = 1 << 30


class LocalTeacher:
    def __init__(
        self,
        model,
        vocab_size: int,
        micro_batch_size: int = 0,
        chunk: int = 512,
        autocast: str = "none",
    ):
        self.model = model.eval()
        self.chunk = chunk
        self.autocast = autocast
        self.vocab_size = vocab_size
        self.micro_batch_size = micro_batch_size
        linear_bytes = sum(
            m.weight.numel() * m.weight.element_size()
            for m in model.modules()
            if type(m) is torch.nn.Linear
        )
        self.linear = PackedLinears() if linear_bytes <= PACK_TEACHER_MAX_BYTES else call_module

    @property
    def shared_prompts(self) -> bool:
        """Checked at each call, like plain_head: a hook added later changes the answer."""
        return shared_prompt_supported(self.model)

    def score(self, rollouts: Rollouts) -> torch.Tensor:
        return self.score_topk(rollouts, 0)[0]

    def score_topk(self, rollouts: Rollouts, k: int):
        """Sampled-token log-probs (B, T), and for k > 0 the top-k (+ the sampled token when
        outside them) as (B, T, k + 1) ids and log-probs, padded with -1 / -inf."""
        device = next(self.model.parameters()).device
        step = self.micro_batch_size or rollouts.num_rows
        lps, ids, lpks = [], [], []
        with torch.inference_mode(), autocast_context(device, self.autocast):
            for start in range(0, rollouts.num_rows, step):
                mb = rollouts.slice(start, start + step)
                args = (
                    self.model,
                    mb.tokens_BT.to(device),
                    mb.attention_mask_BT.to(device),
                    rollouts.prompt_len,
                    self.vocab_size,
                )
                if k:
                    lp_BT, ids_BTK, lp_BTK = completion_topk(*args, k)
                    ids.append(ids_BTK)
                    lpks.append(lp_BTK)
                elif self.shared_prompts and contiguous_completions(
                    mb.attention_mask_BT, rollouts.prompt_len
                ):  # each distinct prompt once, no (B, T, V) logits
                    mask_BT = mb.completion_mask_BT.to(device)
                    lp_BT = score_shared_prompts(
                        *args[:3],
                        mask_BT,
                        rollouts.prompt_len,
                        self.vocab_size,
                        self.chunk,
                        self.linear,
                    )
                elif plain_head(self.model) is not None:  # no (B, T, V) logits
                    mask_BT = mb.completion_mask_BT.to(device)
                    lp_BT = score_completions(*args[:3], mask_BT, self.vocab_size, self.chunk)
                else:
                    lp_BT = completion_logprobs(*args)
                lps.append(lp_BT.float())
        mask_BT = rollouts.completion_mask_BT.to(device)
        lp_BT = torch.where(mask_BT, torch.cat(lps), 0.0).clone()  # a plain tensor: a constant
        if not k:
            return lp_BT, None, None
        return lp_BT, torch.cat(ids).clone(), torch.cat(lpks).clone()
