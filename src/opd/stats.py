"""A step's statistics, reduced over ranks: the KL to the teacher(s), importance ratios, rewards.

Every value is a per-token (or per-row) mean over the whole step: sums and counts are added over
ranks first, then divided.
"""

from __future__ import annotations

import torch

from opd.distributed import DistContext
from opd.objectives import reverse_kl
from opd.types import Rollouts


def teacher_kl(batch: Rollouts, ctx: DistContext, n_tokens: float, names: list[str]) -> dict:
    """teacher/kl (the per-token reverse KL the advantages are made of), teacher/logprob and
    sampler/logprob; with several teachers configured (names, the same on every rank),
    teacher/kl/<name> per teacher."""
    mask_BT = batch.completion_mask_BT
    kl_sum = reverse_kl(batch.sampler_lp_BT, batch.teacher_lp_BT, mask_BT).sum().item()
    sums = ctx.sum(
        [
            kl_sum,
            batch.teacher_lp_BT[mask_BT].sum().item(),
            batch.sampler_lp_BT[mask_BT].sum().item(),
        ]
    )
    denom = max(n_tokens, 1)
    metrics = {
        "teacher/kl": sums[0] / denom,
        "teacher/logprob": sums[1] / denom,
        "sampler/logprob": sums[2] / denom,
    }
    if len(names) > 1:
        metrics |= per_teacher_kl(batch, names, ctx)
    return metrics


def per_teacher_kl(batch: Rollouts, names: list[str], ctx: DistContext) -> dict:
    """teacher/kl/<name>: the per-token reverse KL of the rows each teacher scored."""
    mask_BT = batch.completion_mask_BT
    kl_B = reverse_kl(batch.sampler_lp_BT, batch.teacher_lp_BT, mask_BT).sum(-1)
    tokens_B = mask_BT.sum(-1)
    sums = []
    for name in names:
        rows = torch.tensor([n == name for n in batch.teacher_B], device=kl_B.device)
        sums += [kl_B[rows].sum().item(), tokens_B[rows].sum().item()]
    sums = ctx.sum(sums)
    return {
        f"teacher/kl/{name}": sums[2 * i] / sums[2 * i + 1]
        for i, name in enumerate(names)
        if sums[2 * i + 1] > 0
    }
