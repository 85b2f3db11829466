"""RL advantages from a verifiable reward, as pure functions (GRPO-style, no critic).

A completion earns 1.0 when its extracted answer equals the row's answer, else 0.0. The
advantage is the reward minus the mean reward of the prompt's group of G samples (Shao et al.
2024, "DeepSeekMath", GRPO; tinker-cookbook's `compute_grpo_advantages`), the same value on
every completion token, optionally added to the per-token KL advantage of on-policy
distillation:

    A_b     = r_b - mean_{g in group(b)} r_g        [ / (std_{g in group(b)} r_g + 1e-6) ]
    A_{b,t} = A_b + kl_adv_{b,t}                     on the completion mask, 0 elsewhere

with kl_adv_{b,t} = -kl_coef * k_{b,t} from `objectives.kl_advantages`. Rows are prompt-major:
rows [p*G, (p+1)*G) are prompt p's samples.

Std normalisation is off by default: Liu et al. 2025 ("Understanding R1-Zero-Like Training",
Dr. GRPO) show it weights prompts by how unsure the group is, and nanochat and tinker-cookbook
leave it out. When on, the std is the unbiased (Bessel, /(G-1)) one, as TRL's GRPOTrainer uses
(its `nanstd`; TRL adds 1e-4, we 1e-6).

Deliberately left out: the reward is not discounted (each token gets the whole outcome reward,
whatever the KL discount), no length normalisation of rewards, no partial credit, no
format rewards, and no batch-mean baseline on the KL part (tinker-cookbook's
`incorporate_kl_penalty` subtracts the batch-mean k from k_t; that baseline leaves the expected
gradient unchanged and belongs with the KL advantage if wanted).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from opd.errors import OpdError


def completion_texts(batch, tokenizer) -> list[str]:
    """Each row's sampled completion decoded to text (special tokens, EOS included, dropped)."""
    return [
        tokenizer.decode(tokens_T[mask_T].tolist(), skip_special_tokens=True)
        for tokens_T, mask_T in zip(batch.tokens_BT, batch.completion_mask_BT, strict=True)
    ]


def extracted(text: str, extract: Callable[[str], str], where: str, name: str = "") -> str:
    """The answer `extract` finds in a completion, stripped; a failing user's extractor is a
    one-line error naming the row and the text."""
    try:
        return str(extract(text)).strip()
    except Exception as e:  # a user's extractor: name the row, not a bare trace
        what = f"extractor {name!r}" if name else "the extractor"
        raise OpdError(f"{where}: {what} failed on {text!r}: {e!r}") from None


def is_correct(predicted: str, answer: object) -> bool:
    """The one answer comparison (rewards and evaluation): a numeric answer in the data (42)
    matches the text "42"."""
    return predicted == str(answer).strip()


def task_rewards(
    texts_B: Sequence[str], answers_B: Sequence[object], extract: Callable[[str], str]
) -> torch.Tensor:
    """(B,) float32: 1.0 where the extracted answer `is_correct`, else 0.0."""
    if len(texts_B) != len(answers_B):
        raise ValueError(f"{len(texts_B)} completions but {len(answers_B)} answers")
    rewards = []
    for b, (text, answer) in enumerate(zip(texts_B, answers_B, strict=True)):
        if answer is None:
            raise OpdError(f"row {b} has no answer: a verifiable reward needs one on every row")
        rewards.append(1.0 if is_correct(extracted(text, extract, f"row {b}"), answer) else 0.0)
    return torch.tensor(rewards, dtype=torch.float32)


def answer_rewards(batch, prompts, tokenizer, extract: Callable[[str], str]) -> torch.Tensor:
    """(B,) on the batch's device: 1.0 where row b's completion answers its prompt's 'answer'."""
    answers_B = [prompts[i].row.get("answer") for i in batch.prompt_index_B.tolist()]
    rewards_B = task_rewards(completion_texts(batch, tokenizer), answers_B, extract)
    return rewards_B.to(batch.tokens_BT.device)


def group_centered(
    rewards_B: torch.Tensor, group_size: int, normalize_std: bool = False
) -> torch.Tensor:
    """(B,) advantages: each reward minus its group's mean, optionally over its group's std.

    A group whose rewards are all equal gets advantage 0 (no signal: nothing to prefer), with
    or without normalisation. group_size 1 gives all zeros.
    """
    if group_size < 1 or rewards_B.numel() % group_size:
        raise ValueError(f"{rewards_B.numel()} rows do not split into groups of {group_size}")
    rewards_PG = rewards_B.float().reshape(-1, group_size)
    adv_PG = rewards_PG - rewards_PG.mean(dim=1, keepdim=True)
    if normalize_std and group_size > 1:
        adv_PG = adv_PG / (rewards_PG.std(dim=1, correction=1, keepdim=True) + 1e-6)
    # exactly 0, not rounding noise: a float mean of equal values can miss them by an ulp
    constant_P1 = rewards_PG.amax(dim=1, keepdim=True) == rewards_PG.amin(dim=1, keepdim=True)
    return torch.where(constant_P1, 0.0, adv_PG).reshape(-1)


def reward_advantages_BT(adv_B: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    """(B, T): each row's advantage on its completion tokens, 0 off the mask."""
    return torch.where(mask_BT, adv_B.float()[:, None], 0.0)


def combined_advantages(
    reward_adv_B: torch.Tensor, kl_adv_BT: torch.Tensor, mask_BT: torch.Tensor
) -> torch.Tensor:
    """(B, T): A_t = reward_adv + kl_adv_t on the mask, 0 elsewhere (whatever kl_adv holds there)."""
    total_BT = reward_adv_B.to(kl_adv_BT.dtype)[:, None] + kl_adv_BT
    return torch.where(mask_BT, total_BT, torch.zeros_like(total_BT))
