"""Log-probabilities of sampled completion tokens through the plain Hugging Face forward: the
functions that teachers, the trainer and the checks use when no fast path applies.

Getting this right is most of the correctness of distillation, so it lives in one place:
- logits at position t-1 score token t (the off-by-one every peer has hit at least once):
  `completion_logits` and `completion_hidden` are the two places that shift;
- position ids come from the attention mask, so left padding does not shift positions;
- logits are cut to the tokenizer's vocabulary, so padded embedding rows take no mass;
- only the completion columns reach the LM head (`logits_to_keep`), never the prompt's.
"""

from __future__ import annotations

import functools
import inspect

import torch

from opd.types import position_ids


@functools.cache
def _forward_params(cls) -> frozenset[str]:
    return frozenset(inspect.signature(cls.forward).parameters)


def token_logprobs(
    logits_BTV: torch.Tensor, tokens_BT: torch.Tensor, vocab_size: int
) -> torch.Tensor:
    """log softmax(logits)[token] over the first vocab_size entries, in float32.

    Uses gather - logsumexp, so no (B, T, V) log-softmax tensor is kept.
    """
    logits_BTV = logits_BTV[..., :vocab_size].float()
    picked_BT = logits_BTV.gather(-1, tokens_BT.unsqueeze(-1)).squeeze(-1)
    return picked_BT - torch.logsumexp(logits_BTV, dim=-1)


def completion_logprobs(
    model,
    tokens_BT: torch.Tensor,
    attention_mask_BT: torch.Tensor,
    prompt_len: int,
    vocab_size: int,
) -> torch.Tensor:
    """(B, T) log p(tokens[:, t] | tokens[:, <t]) for t >= prompt_len; columns before are 0.

    Gradients flow when called with grad enabled (the trainer); teachers call it under
    torch.inference_mode.
    """
    logits_BCV = completion_logits(model, tokens_BT, attention_mask_BT, prompt_len)
    lp_BC = token_logprobs(logits_BCV, tokens_BT[:, prompt_len:], vocab_size)
    return torch.cat([lp_BC.new_zeros(tokens_BT.shape[0], prompt_len), lp_BC], dim=1)


def final_hidden(model, tokens_BT: torch.Tensor, attention_mask_BT: torch.Tensor) -> torch.Tensor:
    """(B, T, H) final-normed hidden states of a transformers causal LM's backbone.

    Same inputs as `completion_logprobs` (positions from the attention mask), so
    model.get_output_embeddings()(hidden) equals the model's logits.
    """
    out = model.get_decoder()(
        input_ids=tokens_BT,
        attention_mask=attention_mask_BT,
        position_ids=position_ids(attention_mask_BT),
        use_cache=False,
    )
    return out.last_hidden_state


def completion_hidden(model, tokens_BT, attention_mask_BT, completion_mask_BT):
    """Hidden states (N, H) that predict the N completion tokens (the state at column c - 1
    predicts the token at c), their rows/cols and ids, in completion_mask_BT.nonzero() order.

    The last column is never fed: no token follows it.
    """
    rows_N, cols_N = completion_mask_BT.nonzero(as_tuple=True)
    hidden_BTH = final_hidden(model, tokens_BT[:, :-1], attention_mask_BT[:, :-1])
    return hidden_BTH[rows_N, cols_N - 1], rows_N, cols_N, tokens_BT[rows_N, cols_N]


def completion_logits(model, tokens_BT, attention_mask_BT, prompt_len: int) -> torch.Tensor:
    """(B, T - prompt_len, V) logits that predict the completion columns (position t-1 for t)."""
    n_completion = tokens_BT.shape[1] - prompt_len
    kwargs = {}
    if "logits_to_keep" in _forward_params(type(model)):
        kwargs["logits_to_keep"] = n_completion + 1
    out = model(
        input_ids=tokens_BT,
        attention_mask=attention_mask_BT,
        position_ids=position_ids(attention_mask_BT),
        use_cache=False,
        **kwargs,
    )
    return out.logits[:, -(n_completion + 1) : -1]  # positions prompt_len-1 .. T-2


def completion_topk(model, tokens_BT, attention_mask_BT, prompt_len: int, vocab_size: int, k: int):
    """Sampled-token log-probs (B, T) and the top-k of every completion position.

    The top-k come as (B, T, k + 1) ids and log-probs: the k most likely tokens, then the sampled
    token when it is not among them (else id -1, log-prob -inf); prompt columns hold -1 / -inf.
    """
    B, T = tokens_BT.shape
    logits_BCV = completion_logits(model, tokens_BT, attention_mask_BT, prompt_len)
    lp_BCV = torch.log_softmax(logits_BCV[..., :vocab_size].float(), dim=-1)
    sampled_BC = tokens_BT[:, prompt_len:]
    lp_BC = lp_BCV.gather(-1, sampled_BC.unsqueeze(-1)).squeeze(-1)
    top_lp_BCK, top_id_BCK = lp_BCV.topk(min(k, vocab_size), dim=-1)
    if k > vocab_size:  # a tiny vocabulary: pad to k entries
        pad = (0, k - vocab_size)
        top_lp_BCK = torch.nn.functional.pad(top_lp_BCK, pad, value=-torch.inf)
        top_id_BCK = torch.nn.functional.pad(top_id_BCK, pad, value=-1)
    inside_BC = (top_id_BCK == sampled_BC.unsqueeze(-1)).any(-1)
    extra_id = torch.where(inside_BC, -1, sampled_BC)
    extra_lp = torch.where(inside_BC, -torch.inf, lp_BC)
    ids_BCK = torch.cat([top_id_BCK, extra_id.unsqueeze(-1)], dim=-1)
    lpk_BCK = torch.cat([top_lp_BCK, extra_lp.unsqueeze(-1)], dim=-1)
    ids_BTK = torch.cat([ids_BCK.new_full((B, prompt_len, k + 1), -1), ids_BCK], dim=1)
    lpk_BTK = torch.cat([lpk_BCK.new_full((B, prompt_len, k + 1), -torch.inf), lpk_BCK], dim=1)
    lp_BT = torch.cat([lp_BC.new_zeros(B, prompt_len), lp_BC], dim=1)
    return lp_BT, ids_BTK, lpk_BTK
