"""Log-probabilities of sampled completion tokens: one function for teacher, trainer and checks.

Getting this right is most of the correctness of distillation, so it lives in one place:
- logits at position t-1 score token t (the off-by-one every peer has hit at least once);
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
    B, T = tokens_BT.shape
    n_completion = T - prompt_len
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
    logits_BTV = out.logits[:, -(n_completion + 1) : -1]  # positions prompt_len-1 .. T-2
    lp_BC = token_logprobs(logits_BTV, tokens_BT[:, prompt_len:], vocab_size)
    return torch.cat([lp_BC.new_zeros(B, prompt_len), lp_BC], dim=1)
