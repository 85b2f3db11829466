"""The maths of on-policy distillation, as pure functions of tensors.

Implements the per-token reverse-KL advantage and the importance-sampled policy-gradient loss of
Thinking Machines Lab, "On-Policy Distillation" (2025), which follow tinker-cookbook's RL loss:

    k_t  = logp_sampler_t - logp_teacher_t            (per-token reverse KL, one-sample estimate)
    A_t  = -kl_coef * k_t                            (discount 0: each token judged alone)
    loss = -sum_t exp(logp_train_t - logp_sampler_t) * A_t / N

where N is the number of completion tokens in the whole optimizer batch (all micro-batches and
all ranks), so the gradient does not depend on how the batch is split. Advantages are constants
(no gradient flows into the teacher or the sampler's log-probs).

Deliberately left out here: a value function or baseline (the teacher's log-prob is a dense,
per-token reward, so none is needed), advantage normalisation (it would rescale the KL), and
entropy bonuses. Every tensor argument is (B, T); masked positions may hold any finite value or
not, they never reach the result.
"""

from __future__ import annotations

import math

import torch


def reverse_kl(
    sampler_lp_BT: torch.Tensor, teacher_lp_BT: torch.Tensor, mask_BT: torch.Tensor
) -> torch.Tensor:
    """Per-token reverse KL estimate k_t = logp_sampler - logp_teacher, 0 off the mask."""
    return torch.where(mask_BT, sampler_lp_BT - teacher_lp_BT, torch.zeros_like(sampler_lp_BT))


def discounted_cumsum(x_BT: torch.Tensor, mask_BT: torch.Tensor, gamma: float) -> torch.Tensor:
    """y_t = sum_{u >= t, u in mask} gamma^(u - t) x_u, computed right to left; 0 off the mask.

    gamma = 0 returns x itself (masked).
    """
    x_BT = torch.where(mask_BT, x_BT, torch.zeros_like(x_BT))
    if gamma == 0:
        return x_BT
    out_BT = torch.empty_like(x_BT)
    running_B = torch.zeros_like(x_BT[:, 0])
    for t in range(x_BT.shape[1] - 1, -1, -1):
        running_B = x_BT[:, t] + gamma * running_B
        out_BT[:, t] = running_B
    return torch.where(mask_BT, out_BT, torch.zeros_like(out_BT))


def kl_advantages(
    sampler_lp_BT: torch.Tensor,
    teacher_lp_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    kl_coef: float,
    discount: float = 0.0,
    deadzone: float = 0.0,
) -> torch.Tensor:
    """A_t = -kl_coef * k_t, or its discounted future sum when discount > 0.

    deadzone > 0: a token whose |k_t| is below it counts as k_t = 0. When the teacher is the
    student itself, k_t is float rounding between two forwards of one model (~1e-7), and Adam's
    per-parameter normalisation would turn that noise into full-size steps.
    """
    k_BT = reverse_kl(sampler_lp_BT, teacher_lp_BT, mask_BT)
    if deadzone > 0:
        k_BT = torch.where(k_BT.abs() < deadzone, torch.zeros_like(k_BT), k_BT)
    per_token_BT = -kl_coef * k_BT
    return discounted_cumsum(per_token_BT, mask_BT, discount)


def policy_gradient_loss(
    train_lp_BT: torch.Tensor,
    sampler_lp_BT: torch.Tensor,
    advantages_BT: torch.Tensor,
    mask_BT: torch.Tensor,
    num_tokens: int | float,
    clip_ratio: float = 0.0,
    tis_cap: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Importance-sampled policy-gradient loss, summed over masked tokens and divided by num_tokens.

    num_tokens is the completion-token count of the whole optimizer batch, not of this call's
    rows: summing the returned losses of all micro-batches then gives the batch mean.
    With clip_ratio = c > 0 the PPO surrogate -min(r A, clip(r, 1-c, 1+c) A) is used. With
    tis_cap = m > 0 (truncated importance sampling) each token weighs min(r, m) instead of r:
    the value is -min(r, m) A and the gradient min(r, m) A grad log p (the cap is detached).
    Returns the loss and detached ratio statistics over the masked tokens.
    """
    zeros = torch.zeros_like(train_lp_BT)
    # where(), not multiplication by the mask: 0 * inf or 0 * nan would poison the gradient.
    log_ratio_BT = torch.where(mask_BT, train_lp_BT - sampler_lp_BT.detach(), zeros)
    ratio_BT = torch.exp(log_ratio_BT)
    adv_BT = torch.where(mask_BT, advantages_BT.detach(), zeros)
    weight_BT = ratio_BT
    if tis_cap > 0:  # min(r, m) in value, and r's gradient scaled to it
        weight_BT = ratio_BT * (torch.clamp(ratio_BT, max=tis_cap) / ratio_BT).detach()
    surrogate_BT = weight_BT * adv_BT
    if clip_ratio > 0:
        clipped_BT = torch.clamp(ratio_BT, 1 - clip_ratio, 1 + clip_ratio) * adv_BT
        surrogate_BT = torch.minimum(surrogate_BT, clipped_BT)
    loss = -torch.where(mask_BT, surrogate_BT, zeros).sum() / max(float(num_tokens), 1.0)
    with torch.no_grad():
        r = ratio_BT[mask_BT]
        stats = {
            "ratio_sum": r.sum(),
            "ratio_max": r.max() if r.numel() else torch.tensor(1.0),
            "ratio_min": r.min() if r.numel() else torch.tensor(1.0),
        }
    return loss, stats


def nll_loss(
    train_lp_BT: torch.Tensor, mask_BT: torch.Tensor, num_tokens: int | float
) -> torch.Tensor:
    """Supervised (SFT) loss: -sum of masked log-probs / num_tokens (the whole batch's count)."""
    picked_BT = torch.where(mask_BT, train_lp_BT, torch.zeros_like(train_lp_BT))
    return -picked_BT.sum() / max(float(num_tokens), 1.0)


def lr_at(
    step: int,
    peak_lr: float,
    warmup_steps: int,
    total_steps: int,
    schedule: str,
    min_lr_ratio: float = 0.0,
) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warm-up, then constant or cosine."""
    if warmup_steps > 0 and step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return peak_lr
    span = max(total_steps - warmup_steps, 1)
    progress = min(max(step - warmup_steps, 0) / span, 1.0)
    return peak_lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
