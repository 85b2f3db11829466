"""Non-finite values and exploding weights, by the book.

A step whose sampler or teacher log-probs, loss or gradient holds a NaN or an infinity is
skipped: the optimizer does not step (its moments and step count stay as they were), the
gradients are dropped, and the learning-rate schedule, a function of the step number, moves on
as it always does. Each log-prob is looked at where it lands on the batch, before it reaches a
loss, so the verdict names where the bad value came from. Skips are counted
(`optim/skipped_steps` in metrics.jsonl, cumulative); optim.max_skipped of them in a row are
tolerated and one more stops the run, naming what went non-finite and the newest checkpoint on
disk. The counts are saved in every checkpoint, so a resumed run skips and stops exactly as an
unbroken one does.

Weights are looked at before every checkpoint and before the final save: a NaN, an infinity, or
a weight beyond the bound below is never written (the step that made it is long gone; the
newest checkpoint is the one to go back to).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from opd import checkpoint
from opd.distributed import DistContext
from opd.errors import OpdError
from opd.types import Rollouts

# The largest |w| a trained weight may reach before it counts as exploded: trained language
# models keep every weight far below it (norm gains and embeddings stay within a few hundred),
# and one update at a learning rate far too high (lr=1e6) lands far beyond it. A model that
# starts above it is held to 10 x its own largest weight instead (`weight_bound`).
WEIGHT_BOUND = 1e4

HINTS = {
    "sampler log-probs": "the sampling model (the student; the teacher for opd sft) gives "
    "non-finite logits: check its weights and dtype",
    "teacher log-probs": "check the teacher's weights and model.teacher_dtype (bfloat16 "
    "overflows where float32 does not)",
    "loss": "the student's log-probs or the advantages are not finite",
    "gradient": "the update overflowed: lower optim.lr, or clip with optim.grad_clip",
}


def kind(values: torch.Tensor) -> str:
    """'NaN', 'inf' or '' for a tensor (a NaN is named first: it is the worse news)."""
    if torch.isnan(values).any():
        return "NaN"
    return "" if torch.isfinite(values).all() else "inf"


def nonfinite(batch: Rollouts, loss: float, grad_norm: float, ctx: DistContext) -> str:
    """What went non-finite in this step, in the order the values were made ('' when nothing
    did), the same on every rank: the loss and the gradient norm are already reduced over ranks,
    the batch's log-probs are reduced here."""
    mask_BT = batch.completion_mask_BT
    found = [kind(batch.sampler_lp_BT[mask_BT])]
    teacher = ""
    if batch.teacher_lp_BT is not None:
        teacher = kind(batch.teacher_lp_BT[mask_BT])
    if batch.teacher_topk_lp_BTK is not None and not teacher:  # padded with -inf: NaN only
        teacher = "NaN" if torch.isnan(batch.teacher_topk_lp_BTK).any() else ""
    found.append(teacher)
    codes = ctx.max([{"": 0.0, "inf": 1.0, "NaN": 2.0}[k] for k in found])
    names = ["sampler log-probs", "teacher log-probs"]
    for name, code in zip(names, codes, strict=True):
        if code:
            return f"{name} ({'NaN' if code == 2 else 'inf'})"
    if not math.isfinite(loss):
        return f"loss ({loss})"
    if not math.isfinite(grad_norm):
        return f"gradient (norm {grad_norm})"
    return ""


class SkipCount:
    """Steps skipped for a non-finite value: in all, and in a row (checkpointed)."""

    def __init__(self) -> None:
        self.total = 0
        self.in_a_row = 0

    def record(self, step: int, fault: str, max_skipped: int, out: str) -> int:
        """Count step (0-based) as skipped when fault names what went non-finite; returns the
        total so far. One skip more than max_skipped in a row stops the run."""
        if not fault:
            self.in_a_row = 0
            return self.total
        self.total += 1
        self.in_a_row += 1
        if self.in_a_row > max_skipped:
            what, _, value = fault.partition(" (")
            n = self.in_a_row
            streak = f" in {n} steps in a row, each skipped" if n > 1 else ", the step skipped"
            raise OpdError(
                f"step {step + 1}: {what} not finite ({value.rstrip(')')}){streak}: more than "
                f"optim.max_skipped={max_skipped}; {HINTS[what]}; {last_checkpoint(out)}"
            )
        return self.total

    def state_dict(self) -> dict[str, int]:
        return {"total": self.total, "in_a_row": self.in_a_row}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.total = int(state.get("total", 0))
        self.in_a_row = int(state.get("in_a_row", 0))


def last_checkpoint(out: str) -> str:
    """Where a stopped run can go back to, in words."""
    found = checkpoint.list_checkpoints(Path(out) / "checkpoints")
    return f"the last checkpoint is {found[-1]}" if found else "no checkpoint written yet"


def weight_bound(params: list[torch.nn.Parameter]) -> float:
    """WEIGHT_BOUND, or 10 x the largest |w| of a model that starts above it."""
    start = max((float(p.detach().abs().max()) for p in params if p.numel()), default=0.0)
    return max(WEIGHT_BOUND, 10 * start)


def check_weights(params: list[torch.nn.Parameter], bound: float, when: str, out: str) -> None:
    """Refuse to save weights that are not finite or beyond the bound (every rank alike: the
    weights are the same on every rank); `when` names the save ("step 40", "at the end")."""
    largest = max((float(p.detach().abs().max()) for p in params if p.numel()), default=0.0)
    if math.isfinite(largest) and largest <= bound:
        return
    what = (
        f"have exploded (max |w| {largest:.3g}, beyond {bound:g})"
        if math.isfinite(largest)
        else "are not finite"
    )
    raise OpdError(
        f"{when}: the trained weights {what}, so they were not saved: lower optim.lr, or "
        f"clip with optim.grad_clip; {last_checkpoint(out)}"
    )
