"""Teacher scoring that runs each distinct prompt once for all the rows that share it.

A step samples G completions per prompt, so an in-process teacher that scores the rows one by
one runs every prompt G times. Here (for the models `samplers/kv.py` supports) the distinct
prompts go through the teacher once, filling a KV cache; the cache is copied to the rows that
share each prompt; then every row's completion tokens go through in one pass against it
(causal within the completion, the prompt's padding masked). The hidden states that predict
completion tokens meet the LM head chunk by chunk (`heads.logprobs_at`). Same
log-probs as `scoring.completion_logprobs`, with (G - 1) / G of the prompt tokens' work saved:
for long shared prompts (a chat template and a problem statement, G = 4 to 16) most of it.

Rows share a prompt when their prompt columns (tokens and attention) are identical; nothing is
trusted from metadata. Left out: sharing between prompts with a common prefix. The trainer's
differentiable twin is `opd.prompt_sharing`.
"""

from __future__ import annotations

import torch

from opd.heads import logprobs_at, plain_head
from opd.models import inner_model
from opd.packed import call_module
from opd.samplers.kv import additive, decoder_layer, kv_supported, prefill


def shared_prompt_supported(model) -> bool:
    return kv_supported(model) is None and plain_head(model) is not None


def contiguous_completions(attention_mask_BT: torch.Tensor, prompt_len: int) -> bool:
    """True when every row's completion is real tokens then padding, no gap (what samplers
    and `data.pack` produce, and what the positions and mask here assume)."""
    att_BC = attention_mask_BT[:, prompt_len:]
    return bool((att_BC[:, 1:] <= att_BC[:, :-1]).all())


def distinct_prompts(tokens_BT, attention_mask_BT, prompt_len: int):
    """(tokens_UL, attention_UL, row_to_u_B): the batch's U distinct prompts (rows whose prompt
    columns, tokens and attention, are identical) and which of them each row holds."""
    prompt_B2L = torch.stack([tokens_BT[:, :prompt_len], attention_mask_BT[:, :prompt_len]], 1)
    unique_U2L, row_to_u_B = torch.unique(prompt_B2L, dim=0, return_inverse=True)
    return unique_U2L[:, 0], unique_U2L[:, 1], row_to_u_B


def completion_tables(attention_BL, L: int, cos_SD, sin_SD, dtype):
    """For L completion columns after left-padded prompts: rotary cos/sin (B, L, 1, D) at
    their positions (counted from each prompt's first real token), and the queries' additive
    mask (B, 1, L, Lp + L): column Lp + i sees the prompt's real tokens and columns <= Lp + i."""
    (B, Lp), device = attention_BL.shape, attention_BL.device
    pos_BL = attention_BL.sum(-1, keepdim=True) + torch.arange(L, device=device)
    causal_LL = torch.ones(L, L, dtype=torch.bool, device=device).tril()
    seen_B1LS = torch.cat(
        [attention_BL.bool()[:, None, None, :].expand(B, 1, L, Lp), causal_LL.expand(B, 1, L, L)],
        dim=-1,
    )
    return cos_SD[pos_BL][:, :, None], sin_SD[pos_BL][:, :, None], additive(seen_B1LS, dtype)


def score_shared_prompts(
    model,
    tokens_BT,
    attention_mask_BT,
    completion_mask_BT,
    prompt_len: int,
    vocab_size: int,
    chunk,
    linear=call_module,
) -> torch.Tensor:
    """(B, T) float32 log-probs of the completion tokens (0 elsewhere); call under inference_mode.

    linear(module, x) runs the projections (LocalTeacher passes `packed.PackedLinears`).
    """
    model = inner_model(model)
    core = model.model
    layers = core.layers[: model.config.num_hidden_layers]
    B, T = tokens_BT.shape
    Lp, L = prompt_len, T - prompt_len - 1  # the last column is never fed: nothing follows it
    tokens_UL, attention_UL, row_to_u_B = distinct_prompts(tokens_BT, attention_mask_BT, Lp)
    # hidden_U: the last prompt position's hidden state, which predicts completion column Lp
    hidden_UE, cache_Y2BKSD, cos_SD, sin_SD = prefill(
        model, tokens_UL, attention_UL, T - 1, False, row_to_u_B, linear
    )
    hidden_BCE = hidden_UE[row_to_u_B][:, None]
    if L > 0:
        cos_BL1D, sin_BL1D, mask_B1LS = completion_tables(
            attention_mask_BT[:, :Lp], L, cos_SD, sin_SD, core.embed_tokens.weight.dtype
        )
        x_ME = core.embed_tokens(tokens_BT[:, Lp : T - 1]).reshape(B * L, -1)
        for layer, kv in zip(layers, cache_Y2BKSD, strict=True):
            x_ME = decoder_layer(layer, x_ME, cos_BL1D, sin_BL1D, mask_B1LS, kv, Lp, linear=linear)
        hidden_BCE = torch.cat([hidden_BCE, core.norm(x_ME).view(B, L, -1)], 1)
    rows_N, cols_N = completion_mask_BT.nonzero(as_tuple=True)
    h_NE = hidden_BCE[rows_N, cols_N - Lp]
    return logprobs_at(plain_head(model), h_NE, rows_N, cols_N, tokens_BT, vocab_size, chunk)
