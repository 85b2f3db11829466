"""The table of objectives: what each (objective.kind, objective.loss) needs scored, its
advantages and its loss. The run looks an objective up here once and never branches on it.

| kind, loss    | samples   | teacher gives     | advantages                         | loss                       |
|---------------|-----------|-------------------|------------------------------------|----------------------------|
| opd, sampled  | student's | sampled log-probs | -kl_coef * k_t (+ reward_coef * r) | importance-sampled PG      |
| opd, topk     | student's | + top-k log-probs | none                               | top-k reverse KL + tail    |
| opd, full     | student's | logits            | none                               | full-vocabulary reverse KL |
| opd, jsd      | student's | logits            | none                               | generalized JSD            |
| sft           | teacher's | nothing           | none                               | NLL of the completions     |
| rl            | student's | nothing (rewards) | group-centred reward               | importance-sampled PG      |

Each loss back-propagates one micro-batch, normalised by the step's completion tokens over
every micro-batch and rank (`n_tokens`), so the gradients add up to the step mean however the
step is split. The maths is in objectives.py, rewards.py and divergences.py (pure functions);
here it is only picked and applied. A setting that the chosen objective does not read is
refused (`check_settings`), so no value is silently ignored.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from opd.config import ObjectiveConfig
from opd.divergences import divergence_loss_chunked, gather_topk_fn
from opd.errors import OpdError
from opd.fast.heads import fused_token_loss, plain_head
from opd.fast.shared_prompt import shared_prompt_hidden
from opd.logprobs import completion_logprobs
from opd.objectives import kl_advantages, nll_loss, policy_gradient_loss
from opd.rewards import combined_advantages, group_centered, reward_advantages_BT
from opd.types import Rollouts


@dataclass
class LossStats:
    """One micro-batch's share of the step: its loss and importance-ratio statistics."""

    loss: float = 0.0
    ratio_sum: float = 0.0
    ratio_max: float = 0.0
    ratio_min: float = math.inf
    gap_sum: float = 0.0  # sum of |lp_train - lp_sampler|: how far the sampler's numbers are

    def add(self, other: LossStats) -> LossStats:
        return LossStats(
            self.loss + other.loss,
            self.ratio_sum + other.ratio_sum,
            max(self.ratio_max, other.ratio_max),
            min(self.ratio_min, other.ratio_min),
            self.gap_sum + other.gap_sum,
        )


@dataclass(frozen=True)
class Trainer:
    """What a loss needs besides the batch: the student and how to run it."""

    student: torch.nn.Module
    vocab_size: int
    settings: ObjectiveConfig
    fast: bool  # run.fast_paths


# (batch, objective settings, group size) -> (B, T) advantages, or None when the loss has none
Advantages = Callable[[Rollouts, ObjectiveConfig, int], torch.Tensor | None]
# (trainer, micro-batch, the step's completion tokens) -> stats; back-propagates the loss
Backward = Callable[[Trainer, Rollouts, float], LossStats]


@dataclass(frozen=True)
class Objective:
    teacher: str  # what the score step asks of the teacher: "", "sampled", "topk", "logits"
    advantages: Advantages
    backward: Backward
    reads: frozenset[str]  # the objective.* settings this objective acts on
    importance_ratio: bool = False  # whether the loss weighs tokens by exp(lp_train - lp_sampler)
    # whether its advantages read the policy's own log-probs (k_t): on rows an older policy
    # sampled, k_t is taken from the trained one (objective.stale_kl=trainer, for_stale_rows)
    policy_kl: bool = False
    # whose tokens it trains on: the student's own samples, or the teacher's samples (the
    # rows' own completions when there is no teacher)
    samples: str = "student"


# -- advantages ------------------------------------------------------------------------------


def no_advantages(batch: Rollouts, settings: ObjectiveConfig, group_size: int) -> None:
    return None


def kl_and_reward_advantages(batch: Rollouts, settings: ObjectiveConfig, group_size: int):
    """A_t = -kl_coef * k_t, plus reward_coef * the group-centred reward when rewards came. k_t
    is the policy's log-prob minus the teacher's: the sampler's, or the trained policy's when an
    older policy sampled the rows (`policy_lp_BT`)."""
    mask_BT = batch.completion_mask_BT
    adv_BT = kl_advantages(
        batch.sampler_lp_BT if batch.policy_lp_BT is None else batch.policy_lp_BT,
        batch.teacher_lp_BT,
        mask_BT,
        settings.kl_coef,
        settings.discount,
        settings.kl_deadzone,
    )
    if batch.rewards_B is None:
        return adv_BT
    reward_B = group_centered(batch.rewards_B, group_size, settings.reward_std)
    return combined_advantages(settings.reward_coef * reward_B, adv_BT, mask_BT)


def for_stale_rows(batch: Rollouts, settings: ObjectiveConfig, rescore) -> Rollouts:
    """Rows an older policy sampled, made to take k_t from the trained policy: per token
    (no discount, no deadzone) the loss corrects A_t from its own forward (stale_kl_coef);
    otherwise `rescore(batch)`, one more forward of the student, gives the log-probs first."""
    if settings.discount == 0 and settings.kl_deadzone == 0:
        return dataclasses.replace(batch, stale_kl_coef=settings.kl_coef)
    return dataclasses.replace(batch, policy_lp_BT=rescore(batch))


def reward_advantages(batch: Rollouts, settings: ObjectiveConfig, group_size: int):
    reward_B = group_centered(batch.rewards_B, group_size, settings.reward_std)
    return reward_advantages_BT(reward_B, batch.completion_mask_BT)


# -- losses ----------------------------------------------------------------------------------

# (the N completion tokens' train log-probs, or a chunk of them, and that chunk's slice) -> loss
TokenLoss = Callable[[torch.Tensor, slice], torch.Tensor]


def token_backward(
    trainer: Trainer, mb: Rollouts, loss_of: TokenLoss
) -> tuple[float, torch.Tensor]:
    """Back-propagate a per-token loss of the completion tokens' log-probs; returns its value
    and the (N,) log-probs (constants), in completion_mask_BT.nonzero() order.

    Fast: the LM head chunk by chunk with its gradient fused (fast/heads.py), after a forward
    that runs each shared prompt once. Plain: the model's forward and `completion_logprobs`.
    """
    model, mask_BT = trainer.student, mb.completion_mask_BT
    args = (model, mb.tokens_BT, mb.attention_mask_BT)
    if trainer.fast and plain_head(model) is not None:
        hidden = shared_prompt_hidden(*args, mask_BT, mb.prompt_len)  # None: the plain forward
        loss, lp_N, _ = fused_token_loss(
            *args, mask_BT, trainer.vocab_size, loss_of, trainer.settings.chunk_tokens, hidden
        )
    else:
        lp_N = completion_logprobs(*args, mb.prompt_len, trainer.vocab_size)[mask_BT]
        loss = loss_of(lp_N, slice(None))
        lp_N = lp_N.detach()
    loss.backward()
    return loss.item(), lp_N


def policy_gradient(trainer: Trainer, mb: Rollouts, n_tokens: float) -> LossStats:
    """-sum_t exp(lp_train - lp_sampler) A_t / n_tokens (PPO-clipped with clip_ratio > 0). Rows
    an older policy sampled (stale_kl_coef) take k_t from lp_train: A_t - coef (lp_train -
    lp_sampler), lp_train detached there."""
    mask_BT, s = mb.completion_mask_BT, trainer.settings
    sampler_lp_N, adv_N = mb.sampler_lp_BT[mask_BT], mb.advantages_BT[mask_BT]

    def loss_of(lp_n: torch.Tensor, sl: slice) -> torch.Tensor:
        ones_n = torch.ones_like(lp_n, dtype=torch.bool)
        adv_n = adv_N[sl]
        if mb.stale_kl_coef:
            adv_n = adv_n - mb.stale_kl_coef * (lp_n.detach() - sampler_lp_N[sl])
        return policy_gradient_loss(
            lp_n, sampler_lp_N[sl], adv_n, ones_n, n_tokens, s.clip_ratio, s.tis_cap
        )[0]

    loss, lp_N = token_backward(trainer, mb, loss_of)
    ratio_N = torch.exp(lp_N - sampler_lp_N)
    if not ratio_N.numel():
        return LossStats(loss)
    gap = (lp_N - sampler_lp_N).abs().sum().item()
    return LossStats(loss, ratio_N.sum().item(), ratio_N.max().item(), ratio_N.min().item(), gap)


def negative_log_likelihood(trainer: Trainer, mb: Rollouts, n_tokens: float) -> LossStats:
    """-sum_t lp_train / n_tokens: SFT on the batch's completions."""

    def loss_of(lp_n: torch.Tensor, sl: slice) -> torch.Tensor:
        return nll_loss(lp_n, torch.ones_like(lp_n, dtype=torch.bool), n_tokens)

    return LossStats(token_backward(trainer, mb, loss_of)[0])


def divergence(kind: str) -> Backward:
    """The chunked divergence `kind` (divergences.py) against the batch's teacher output."""

    def backward(trainer: Trainer, mb: Rollouts, n_tokens: float) -> LossStats:
        teacher_fn = mb.teacher_logits
        if kind == "topk_reverse_kl":
            teacher_fn = gather_topk_fn(mb.teacher_topk_ids_BTK, mb.teacher_topk_lp_BTK)
        s = trainer.settings
        loss, _ = divergence_loss_chunked(
            trainer.student, mb, teacher_fn, kind, trainer.vocab_size, n_tokens,
            s.chunk_tokens, s.jsd_beta, trainer.fast,
        )  # fmt: skip
        return LossStats(loss)

    return backward


# -- the table -------------------------------------------------------------------------------

REWARD = frozenset({"reward_coef", "reward_std", "extractor"})
ALWAYS = frozenset({"kind", "loss", "chunk_tokens"})

OBJECTIVES: dict[tuple[str, str], Objective] = {
    ("opd", "sampled"): Objective(
        "sampled",
        kl_and_reward_advantages,
        policy_gradient,
        ALWAYS
        | REWARD
        | {"kl_coef", "discount", "kl_deadzone", "clip_ratio", "tis_cap", "stale_kl"},
        importance_ratio=True,
        policy_kl=True,
    ),
    ("opd", "topk"): Objective(
        "topk", no_advantages, divergence("topk_reverse_kl"), ALWAYS | {"topk"}
    ),
    ("opd", "full"): Objective("logits", no_advantages, divergence("reverse_kl"), ALWAYS),
    ("opd", "jsd"): Objective("logits", no_advantages, divergence("jsd"), ALWAYS | {"jsd_beta"}),
    ("sft", "sampled"): Objective(
        "", no_advantages, negative_log_likelihood, ALWAYS, samples="teacher"
    ),
    ("rl", "sampled"): Objective(
        "",
        reward_advantages,
        policy_gradient,
        ALWAYS | {"reward_std", "extractor", "clip_ratio", "tis_cap"},
        importance_ratio=True,
    ),
}


def uses_rewards(settings: ObjectiveConfig) -> bool:
    return settings.kind == "rl" or settings.reward_coef > 0


def objective_for(settings: ObjectiveConfig) -> Objective:
    """The table's entry for these settings, after `check_settings`."""
    check_settings(settings)
    return OBJECTIVES[(settings.kind, settings.loss)]


def check_settings(settings: ObjectiveConfig) -> None:
    """Refuse a combination the table lacks, and any objective.* setting moved from its default
    that the chosen objective does not read (it would be silently ignored)."""
    key = (settings.kind, settings.loss)
    if key not in OBJECTIVES:
        raise OpdError(
            f"objective.loss={settings.loss!r} applies to objective.kind='opd' only "
            f"(objective.kind={settings.kind!r} has its own loss)"
        )
    reads = OBJECTIVES[key].reads
    if not uses_rewards(settings):
        reads = reads - {"reward_std", "extractor"}
    default = ObjectiveConfig()
    for f in dataclasses.fields(settings):
        value = getattr(settings, f.name)
        if f.name not in reads and value != getattr(default, f.name):
            raise OpdError(
                f"objective.{f.name}={value!r} has no effect with objective.kind={settings.kind!r}"
                + (f", objective.loss={settings.loss!r}" if settings.kind == "opd" else "")
                + f"; leave it at its default ({getattr(default, f.name)!r})"
            )
