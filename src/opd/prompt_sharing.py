"""The trainer's forward with each distinct prompt run once for all the rows that share it.

A step trains on G completions per prompt. A plain forward runs every prompt G times, and the
backward goes back through it G times. Here (for the models `samplers/kv.py` supports) the
distinct prompts go through the layers once, keeping each layer's keys and values; every row's
completion then goes through against its prompt's keys and values, gathered by row, so that
autograd sums the G rows' gradients into the one prompt pass. The products are the model's own
modules (embedding, norms, q/k/v/o projections, MLP, Qwen3's q_norm/k_norm), so LoRA layers and
their gradients apply; the attention is SDPA under HF's padding and causal mask, at the same
positions. Same hidden states as `heads.completion_hidden` up to rounding, with (G - 1) / G of
the prompt tokens' work saved, forward and backward: on a long shared prompt (a chat template
and a problem statement) most of the step's body work.

The teacher's scoring does the same under inference_mode (`teachers/shared_prompt.py`); this is
its differentiable twin, without the in-place cache and activations that autograd cannot take.
"""

from __future__ import annotations

import torch

from opd.models import inner_model
from opd.samplers.kv import additive, attend, rope, rotary_tables
from opd.teachers.shared_prompt import (
    completion_tables,
    contiguous_completions,
    distinct_prompts,
    shared_prompt_supported,
)
from opd.types import position_ids


def trainer_shares_prompts(model, attention_mask_BT, prompt_len: int) -> bool:
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
        and not checkpointing
        and not dropout
        and contiguous_completions(attention_mask_BT, prompt_len)
    )


def _layer(layer, x_ME, A: int, L: int, cos_AL1D, sin_AL1D, mask_A1LS, prefix=None, rows_A=None):
    """One decoder layer on A rows of L tokens; returns (x_ME, this pass's (K, V)).

    prefix: earlier keys and values (K_RKPD, V_RKPD) that row a reads at prefix row rows_A[a].
    """
    attn = layer.self_attn
    D = attn.head_dim
    h_ME = layer.input_layernorm(x_ME)
    q_ALHD = attn.q_proj(h_ME).view(A, L, -1, D)
    k_ALKD = attn.k_proj(h_ME).view(A, L, -1, D)
    v_ALKD = attn.v_proj(h_ME).view(A, L, -1, D)
    if hasattr(attn, "q_norm"):  # Qwen3: per-head RMSNorm before the rotary embedding
        q_ALHD, k_ALKD = attn.q_norm(q_ALHD), attn.k_norm(k_ALKD)
    q_AHLD = rope(q_ALHD, cos_AL1D, sin_AL1D).transpose(1, 2)
    k_AKLD = rope(k_ALKD, cos_AL1D, sin_AL1D).transpose(1, 2)
    v_AKLD = v_ALKD.transpose(1, 2)
    k_AKSD, v_AKSD = k_AKLD, v_AKLD
    if prefix is not None:
        k_AKSD = torch.cat([prefix[0][rows_A], k_AKLD], 2)
        v_AKSD = torch.cat([prefix[1][rows_A], v_AKLD], 2)
    x_ME = x_ME + attn.o_proj(attend(q_AHLD, k_AKSD, v_AKSD, mask_A1LS, attn.scaling))
    return x_ME + layer.mlp(layer.post_attention_layernorm(x_ME)), (k_AKLD, v_AKLD)


def shared_prompt_hidden(model, tokens_BT, attention_mask_BT, completion_mask_BT, prompt_len: int):
    """Like `heads.completion_hidden`: (hidden_NH, rows_N, cols_N, tokens_N) for the N completion
    tokens, differentiable into the model; None when this pass would not reproduce the model's
    forward on this batch (`trainer_shares_prompts`) or no two rows share a prompt (nothing
    saved): the caller then runs the plain forward.

    Rows share a prompt when their prompt columns (tokens and attention) are identical; nothing
    is trusted from metadata.
    """
    if not trainer_shares_prompts(model, attention_mask_BT, prompt_len):
        return None
    model = inner_model(model)
    core = model.model
    layers = core.layers[: model.config.num_hidden_layers]
    B, T = tokens_BT.shape
    Lp, L = prompt_len, T - prompt_len - 1  # the last column is never fed: nothing follows it
    tokens_UL, attention_UL, row_to_u_B = distinct_prompts(tokens_BT, attention_mask_BT, Lp)
    U = tokens_UL.shape[0]
    if U == B:
        return None
    device = tokens_BT.device
    xp_ME = core.embed_tokens(tokens_UL).view(U * Lp, -1)
    cos_SD, sin_SD = rotary_tables(core, xp_ME, T)
    # prompt queries: causal over real tokens, each also sees itself (a pad row stays finite)
    eye_LL = torch.eye(Lp, dtype=torch.bool, device=device)
    seen_U1LL = ((eye_LL.new_ones(Lp, Lp).tril() & attention_UL.bool()[:, None, :]) | eye_LL)[
        :, None
    ]
    # the masks are repeated for grouped query heads here, once for every layer (attend would
    # make, and autograd keep, a copy per layer)
    G = model.config.num_attention_heads // model.config.num_key_value_heads
    mask_U1LL = additive(seen_U1LL, xp_ME.dtype).repeat(1, 1, G, 1)
    pos_UL = position_ids(attention_UL)
    cos_UL1D, sin_UL1D = cos_SD[pos_UL][:, :, None], sin_SD[pos_UL][:, :, None]
    if L > 0:  # completion queries: the prompt's real tokens, then causal within the completion
        cos_BC1D, sin_BC1D, mask_B1CS = completion_tables(
            attention_mask_BT[:, :Lp], L, cos_SD, sin_SD, xp_ME.dtype
        )
        mask_B1CS = mask_B1CS.repeat(1, 1, G, 1)
        xc_ME = core.embed_tokens(tokens_BT[:, Lp : T - 1]).reshape(B * L, -1)
    for layer in layers:
        xp_ME, kv = _layer(layer, xp_ME, U, Lp, cos_UL1D, sin_UL1D, mask_U1LL)
        if L > 0:
            xc_ME, _ = _layer(layer, xc_ME, B, L, cos_BC1D, sin_BC1D, mask_B1CS, kv, row_to_u_B)
    # the last prompt position predicts completion column Lp; completion column Lp + i the next
    hidden_BCE = core.norm(xp_ME.view(U, Lp, -1)[:, -1])[row_to_u_B][:, None]
    if L > 0:
        hidden_BCE = torch.cat([hidden_BCE, core.norm(xc_ME).view(B, L, -1)], 1)
    rows_N, cols_N = completion_mask_BT.nonzero(as_tuple=True)
    return hidden_BCE[rows_N, cols_N - Lp], rows_N, cols_N, tokens_BT[rows_N, cols_N]
