"""Each distinct prompt run once for all the rows that share it: the teacher's scoring and the
trainer's forward, one function for both.

A step samples G completions per prompt. A plain forward runs every prompt G times (and the
trainer's backward goes back through it G times). Here, for the models `llama.kv_supported`
accepts, the distinct prompts go through the layers once; every row's completion then goes
through against its prompt's keys and values, gathered by row (causal within the completion,
the prompt's padding masked, at the same positions as the plain forward). Under autograd the G
rows' gradients sum into the one prompt pass; under inference_mode (the teacher) the same code
scores with packed linears (`packed.PackedLinears`). The hidden states that predict completion
tokens come out compacted to the N completion positions, like `logprobs.completion_hidden`, and
meet the LM head chunk by chunk (`heads.py`). (G - 1) / G of the prompt tokens' work is saved:
on a long shared prompt (a chat template and a problem statement) most of a step's body work.

Rows share a prompt when their prompt columns (tokens and attention) are identical; nothing is
trusted from metadata. Left out: sharing between prompts with a common prefix.
"""

from __future__ import annotations

import torch

from opd.fast.heads import logprobs_at, plain_head
from opd.fast.llama import (
    completion_tables,
    decoder_layer,
    kv_supported,
    prompt_tables,
    rotary_tables,
)
from opd.fast.packed import call_module
from opd.models import inner_model


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


def shared_prompt_supported(model) -> bool:
    """Whether the pass here reproduces this model's forward (the batch aside)."""
    return kv_supported(model) is None and plain_head(model) is not None


def shares_prompts(model, attention_mask_BT, prompt_len: int) -> bool:
    """Whether `shared_prompt_hidden` reproduces this model's forward on this batch."""
    m = inner_model(model)
    checkpointing = getattr(m, "is_activation_checkpointing", None)  # transformers >= 5
    if checkpointing is None:
        checkpointing = getattr(m, "is_gradient_checkpointing", False)
    # in train mode a dropout (attention, LoRA) would draw one mask for a prompt's G rows
    dropout = m.training and (
        getattr(m.config, "attention_dropout", 0.0)
        or any(isinstance(mod, torch.nn.Dropout) and mod.p > 0 for mod in m.modules())
    )
    return (
        shared_prompt_supported(model)
        and not (torch.is_grad_enabled() and checkpointing)
        and not dropout
        and contiguous_completions(attention_mask_BT, prompt_len)
    )


def shared_prompt_hidden(
    model, tokens_BT, attention_mask_BT, completion_mask_BT, prompt_len: int,
    linear=call_module, only_if_shared: bool = True,
):  # fmt: skip
    """Like `logprobs.completion_hidden`: (hidden_NH, rows_N, cols_N, tokens_N) for the N
    completion tokens, differentiable into the model when autograd is on; None when this pass
    would not reproduce the model's forward on this batch (`shares_prompts`) or, with
    only_if_shared, when no two rows share a prompt (nothing saved): the caller then runs the
    plain forward.
    """
    if not shares_prompts(model, attention_mask_BT, prompt_len):
        return None
    model = inner_model(model)
    core = model.model
    layers = core.layers[: model.config.num_hidden_layers]
    B, T = tokens_BT.shape
    Lp, L = prompt_len, T - prompt_len - 1  # the last column is never fed: nothing follows it
    tokens_UL, attention_UL, row_to_u_B = distinct_prompts(tokens_BT, attention_mask_BT, Lp)
    U = tokens_UL.shape[0]
    if only_if_shared and U == B:
        return None
    xp_ME = core.embed_tokens(tokens_UL).view(U * Lp, -1)
    cos_SD, sin_SD = rotary_tables(core, xp_ME, T)
    cos_UL1D, sin_UL1D, mask_U1LL = prompt_tables(attention_UL, cos_SD, sin_SD, xp_ME.dtype)
    # the masks are repeated for grouped query heads here, once for every layer (attend would
    # make, and autograd keep, a copy per layer)
    G = model.config.num_attention_heads // model.config.num_key_value_heads
    mask_U1LL = mask_U1LL.repeat(1, 1, G, 1)
    if L > 0:  # completion queries: the prompt's real tokens, then causal within the completion
        cos_BC1D, sin_BC1D, mask_B1CS = completion_tables(
            attention_mask_BT[:, :Lp], L, cos_SD, sin_SD, xp_ME.dtype
        )
        mask_B1CS = mask_B1CS.repeat(1, 1, G, 1)
        xc_ME = core.embed_tokens(tokens_BT[:, Lp : T - 1]).reshape(B * L, -1)
    prompt_kv = []  # the current layer's prompt keys and values, (U, K, Lp, D) each

    def keep(k_AKLD, v_AKLD):
        prompt_kv[:] = k_AKLD, v_AKLD
        return k_AKLD, v_AKLD

    def after_prompt(k_AKLD, v_AKLD):  # row b reads its prompt's keys and values
        k_UKLD, v_UKLD = prompt_kv
        return (
            torch.cat([k_UKLD[row_to_u_B], k_AKLD], 2),
            torch.cat([v_UKLD[row_to_u_B], v_AKLD], 2),
        )

    for y, layer in enumerate(layers):
        last = y == len(layers) - 1  # only K/V of the earlier positions are needed from here
        xp_ME = decoder_layer(layer, xp_ME, cos_UL1D, sin_UL1D, mask_U1LL, keep, last, linear)
        if L > 0:
            xc_ME = decoder_layer(
                layer, xc_ME, cos_BC1D, sin_BC1D, mask_B1CS, after_prompt, linear=linear
            )
    # the last prompt position predicts completion column Lp; completion column Lp + i the next
    hidden_BCE = core.norm(xp_ME.view(U, -1))[row_to_u_B][:, None]
    if L > 0:
        hidden_BCE = torch.cat([hidden_BCE, core.norm(xc_ME).view(B, L, -1)], 1)
    rows_N, cols_N = completion_mask_BT.nonzero(as_tuple=True)
    return hidden_BCE[rows_N, cols_N - Lp], rows_N, cols_N, tokens_BT[rows_N, cols_N]


def score_shared_prompts(
    model, tokens_BT, attention_mask_BT, completion_mask_BT, prompt_len: int, vocab_size: int,
    chunk: int, linear=call_module,
):  # fmt: skip
    """(B, T) float32 log-probs of the completion tokens (0 elsewhere), or None where the pass
    does not apply; call under inference_mode."""
    hidden = shared_prompt_hidden(
        model, tokens_BT, attention_mask_BT, completion_mask_BT, prompt_len, linear, False
    )
    if hidden is None:
        return None
    h_NE, rows_N, cols_N, _ = hidden
    head = plain_head(inner_model(model))
    return logprobs_at(head, h_NE, rows_N, cols_N, tokens_BT, vocab_size, chunk)
