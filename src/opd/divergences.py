"""Divergence losses on the student's own samples: full reverse KL, generalized JSD, top-k KL.

The default opd loss (objectives.py) is a policy gradient on the sampled token only. Here the
student is instead pulled towards the teacher's whole next-token distribution at every
completion position of its own samples, with gradients flowing through the student's
distribution at that position:

- `full_reverse_kl`: KL(p_student || p_teacher) over the vocabulary, the divergence the
  on-policy distillation blog (Thinking Machines Lab, 2025) estimates from one sample;
- `generalized_jsd`: the generalized JSD of GKD (Agarwal et al., 2024, "On-Policy Distillation
  of Language Models"), with the semantics of TRL's `GKDTrainer.generalized_jsd_loss`;
- `topk_reverse_kl`: reverse KL over a served teacher's top-k tokens plus one tail bucket, for
  teachers that only return top-k log-probs (vLLM `prompt_logprobs`).

`divergence_loss_chunked` applies one of them to a micro-batch without ever holding a (B, T, V)
tensor: the backbone runs once, the LM head and the divergence run per chunk of completion
tokens, and the hidden-state gradient is sent back through the backbone once at the end. The
elementwise map a model applies after its LM head (Gemma's final-logit soft-capping, Cohere's
and Granite's logit scaling: `models.post_head`) is applied to each chunk's logits, so the
logits are the model's own.

Deliberately left out: temperature scaling of the logits, any gradient through the choice of
states (the samples are taken as given, as in GKD; no score-function term), teacher gradients,
and a scaling field on a model type whose use of it opd does not know (refused,
`models.check_plain_head`). Axis suffixes: N completion positions, K teacher top-k entries,
V vocab.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from opd.fast.packed import call_module
from opd.fast.shared_prompt import shared_prompt_hidden
from opd.logprobs import completion_hidden
from opd.models import check_plain_head, inner_model, post_head
from opd.types import LOGP_FLOOR, Rollouts

KINDS = ("reverse_kl", "jsd", "topk_reverse_kl")
# The teacher's tail is 1 - sum(top-k probs) of numbers rounded elsewhere (~1e-7 noise or worse):
# a smaller tail is noise, and clamping keeps its log finite.
TAIL_FLOOR = 1e-8

# (rows_N, cols_N) -> teacher logits (N, V') or (ids_NK, logprobs_NK) for the tokens at
# tokens_BT[rows, cols], i.e. the teacher's distribution given tokens_BT[rows, :cols].
TeacherFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor | tuple[torch.Tensor, torch.Tensor]]


def _kl(p_lp_NV: torch.Tensor, q_lp_NV: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row from log-probabilities.

    A token p cannot emit (log-prob -inf: a masked logit) adds 0, in value and gradient; the raw
    0 * -inf would be NaN. q's log-probs are floored at LOGP_FLOOR, so a token q masks costs a
    large finite amount instead of an infinite one.
    """
    live_NV = p_lp_NV > -math.inf
    p_lp_NV = torch.where(live_NV, p_lp_NV, 0.0)
    q_lp_NV = q_lp_NV.clamp(min=LOGP_FLOOR)
    return torch.where(live_NV, p_lp_NV.exp() * (p_lp_NV - q_lp_NV), 0.0).sum(-1)


def full_reverse_kl(
    student_logits_NV: torch.Tensor, teacher_logits_NV: torch.Tensor
) -> torch.Tensor:
    """(N,) KL(p_student || p_teacher) over the whole vocabulary, in float32."""
    s_lp_NV = torch.log_softmax(student_logits_NV.float(), -1)
    t_lp_NV = torch.log_softmax(teacher_logits_NV.float(), -1)
    return _kl(s_lp_NV, t_lp_NV)


def generalized_jsd(
    student_logits_NV: torch.Tensor, teacher_logits_NV: torch.Tensor, beta: float
) -> torch.Tensor:
    """(N,) generalized JSD of GKD, in float32.

    With m = beta p_teacher + (1 - beta) p_student: beta KL(teacher || m) + (1 - beta)
    KL(student || m). The end points are defined as in GKD/TRL, not as limits of the formula
    (which would be 0): beta = 0 is KL(teacher || student) (forward KL), beta = 1 is
    KL(student || teacher) (reverse KL).
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"generalized_jsd: beta must lie in [0, 1], got {beta}")
    s_lp_NV = torch.log_softmax(student_logits_NV.float(), -1)
    t_lp_NV = torch.log_softmax(teacher_logits_NV.float(), -1)
    if beta == 0.0:
        return _kl(t_lp_NV, s_lp_NV)
    if beta == 1.0:
        return _kl(s_lp_NV, t_lp_NV)
    m_lp_NV = torch.logaddexp(s_lp_NV + math.log1p(-beta), t_lp_NV + math.log(beta))
    return beta * _kl(t_lp_NV, m_lp_NV) + (1 - beta) * _kl(s_lp_NV, m_lp_NV)


def _first_valid(ids_NK: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """(N, K) True on entries with an id in [0, vocab_size) not already seen earlier in the row."""
    K = ids_NK.shape[1]
    valid_NK = (ids_NK >= 0) & (ids_NK < vocab_size)
    earlier_KK = torch.ones(K, K, dtype=torch.bool, device=ids_NK.device).tril(-1)
    same_NKK = (ids_NK[:, :, None] == ids_NK[:, None, :]) & valid_NK[:, None, :] & earlier_KK
    return valid_NK & ~same_NKK.any(-1)


def topk_reverse_kl(
    student_logits_NV: torch.Tensor, teacher_ids_NK: torch.Tensor, teacher_lp_NK: torch.Tensor
) -> torch.Tensor:
    """(N,) reverse KL between the student and teacher over K + 1 buckets, in float32.

    The buckets are the teacher's K token ids and the tail (every other token). teacher_lp_NK
    are log-probs normalised over the teacher's full vocabulary (as vLLM returns them); the
    student's come from its log_softmax over V. Entries with an id outside [0, V) are padding
    (convention: id -1, log-prob -inf), so K may vary per position; a repeated id counts once
    (its first entry). Bucketing can only lose information: 0 <= result <= full_reverse_kl,
    with equality when the ids cover the vocabulary.
    """
    logits_NV = student_logits_NV.float()
    V = logits_NV.shape[-1]
    keep_NK = _first_valid(teacher_ids_NK, V)
    lse_N1 = torch.logsumexp(logits_NV, -1, keepdim=True)
    s_lp_NK = logits_NV.gather(-1, torch.where(keep_NK, teacher_ids_NK, 0)) - lse_N1
    # Padding is made finite before the product: where() alone would still send 0 * inf = NaN
    # into the gradient.
    t_lp_NK = torch.where(keep_NK, teacher_lp_NK.float().clamp(min=LOGP_FLOOR), 0.0)
    head_N = torch.where(keep_NK, s_lp_NK.exp() * (s_lp_NK - t_lp_NK), 0.0).sum(-1)

    # Student tail from the logits outside the set (exact, no 1 - sum cancellation); the extra
    # column V takes the padding entries' writes.
    in_set_NV = torch.zeros(logits_NV.shape[0], V + 1, dtype=torch.bool, device=logits_NV.device)
    in_set_NV.scatter_(1, torch.where(keep_NK, teacher_ids_NK, V), True)
    outside_NV = logits_NV.masked_fill(in_set_NV[:, :V], torch.finfo(torch.float32).min)
    s_tail_lp_N = (torch.logsumexp(outside_NV, -1) - lse_N1[:, 0]).clamp(min=LOGP_FLOOR)
    # Teacher tail: 1 - sum p = -expm1(log sum p), floored (rounding can push the sum past 1).
    t_head_lse_N = torch.logsumexp(torch.where(keep_NK, t_lp_NK, -math.inf), -1)
    t_tail_lp_N = torch.log((-torch.expm1(t_head_lse_N)).clamp(min=TAIL_FLOOR))
    tail_N = s_tail_lp_N.exp() * (s_tail_lp_N - t_tail_lp_N)
    return head_N + tail_N


def teacher_topk(teacher_logits_NV: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k most likely ids of each row and their full-vocabulary log-probs (a local stand-in
    for a served teacher's top-k)."""
    lp_NV = torch.log_softmax(teacher_logits_NV.float(), -1)
    lp_NK, ids_NK = lp_NV.topk(min(k, lp_NV.shape[-1]), dim=-1)
    return ids_NK, lp_NK


def divergence(
    kind: str, student_logits_NV: torch.Tensor, teacher_out, beta: float = 0.5
) -> torch.Tensor:
    """(N,) the divergence `kind` between student logits and the teacher's output for them.

    teacher_out is logits (N, V') for "reverse_kl" and "jsd" (cut here to the student's V), or
    (ids_NK, logprobs_NK) for "topk_reverse_kl".
    """
    V = student_logits_NV.shape[-1]
    if kind == "reverse_kl":
        return full_reverse_kl(student_logits_NV, teacher_out[:, :V])
    if kind == "jsd":
        return generalized_jsd(student_logits_NV, teacher_out[:, :V], beta)
    if kind == "topk_reverse_kl":
        ids_NK, lp_NK = teacher_out
        return topk_reverse_kl(student_logits_NV, ids_NK, lp_NK)
    raise ValueError(f"unknown divergence {kind!r}; expected one of {KINDS}")


def gather_topk_fn(ids_BTK: torch.Tensor, lp_BTK: torch.Tensor) -> TeacherFn:
    """A TeacherFn for stored top-k: entry [b, c] is the teacher's top-k for the token at
    tokens_BT[b, c] (vLLM's prompt_logprobs alignment), padded with id -1 / log-prob -inf."""

    def topk(rows_N: torch.Tensor, cols_N: torch.Tensor):
        rows_N, cols_N = rows_N.to(ids_BTK.device), cols_N.to(ids_BTK.device)
        return ids_BTK[rows_N, cols_N], lp_BTK[rows_N, cols_N]

    return topk


def _to(teacher_out, device):
    if isinstance(teacher_out, tuple):
        return tuple(t.to(device) for t in teacher_out)
    return teacher_out.to(device)


def divergence_loss_chunked(
    student,
    rollouts: Rollouts,
    teacher_fn: TeacherFn,
    kind: str,
    vocab_size: int,
    n_tokens_total: int | float,
    chunk_tokens: int = 1024,
    beta: float = 0.5,
    fast: bool = True,
) -> tuple[float, dict[str, float]]:
    """Back-propagates sum(divergence over completion tokens) / n_tokens_total; returns its value.

    Calls backward itself (accumulating into .grad, like loss.backward() per micro-batch), so
    call it once per micro-batch with the step's global completion-token count: the losses and
    gradients of all micro-batches and ranks then add up to the step mean. Peak memory is the
    backbone's activations plus one chunk's (chunk_tokens, V) logits, student and teacher.
    Logits are cut to vocab_size, so padded embedding rows take no mass, and go through the
    model's `models.post_head` (soft-cap, logit scale) as in its forward.
    Stats: the divergence's sum and max over this call's tokens, and their count.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown divergence {kind!r}; expected one of {KINDS}")
    model = inner_model(student)
    check_plain_head(model)
    head, post = model.get_output_embeddings(), post_head(model.config)
    device = head.weight.device
    mask_BT = rollouts.completion_mask_BT.to(device)
    rows_N, cols_N = mask_BT.nonzero(as_tuple=True)
    N = rows_N.numel()
    if N == 0:
        return 0.0, {"divergence_sum": 0.0, "divergence_max": 0.0, "tokens": 0}

    tokens_BT, attention_BT = rollouts.tokens_BT.to(device), rollouts.attention_mask_BT.to(device)
    args = (model, tokens_BT, attention_BT, mask_BT)
    # each distinct prompt once where rows share prompts (run.fast_paths); else the plain forward
    hidden = shared_prompt_hidden(*args, rollouts.prompt_len) if fast else None
    hidden_NH = (hidden or completion_hidden(*args))[0]  # positions in nonzero() order
    linear = call_module if fast else torch.nn.Module.__call__  # upcast.py's half head, or not
    # The chunks back-propagate into this leaf; the backbone is traversed once, at the end.
    leaf_NH = hidden_NH.detach().requires_grad_()
    denom = max(float(n_tokens_total), 1.0)
    div_sum = torch.zeros((), device=device)
    div_max = torch.zeros((), device=device)
    for start in range(0, N, chunk_tokens):
        chunk = slice(start, start + chunk_tokens)
        logits_NV = post(linear(head, leaf_NH[chunk])[:, :vocab_size].float())
        teacher_out = _to(teacher_fn(rows_N[chunk], cols_N[chunk]), device)
        div_N = divergence(kind, logits_NV, teacher_out, beta)
        (div_N.sum() / denom).backward()
        div_sum += div_N.detach().sum()
        div_max = torch.maximum(div_max, div_N.detach().max())
    hidden_NH.backward(leaf_NH.grad)
    total = div_sum.item()
    return total / denom, {"divergence_sum": total, "divergence_max": div_max.item(), "tokens": N}
