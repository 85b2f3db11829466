"""The Llama-family decoder (Llama, Qwen2, Qwen3, Mistral), written once, for the fast paths.

`decoder_layer` is one layer of these models built from the model's own submodules (embedding,
norms, q/k/v/o and MLP projections, the activation, Qwen3's q_norm/k_norm), so weights are
shared and peft's LoRA layers apply; only the attention arithmetic and the rotary embedding are
ours (rotary cos/sin tabled once per batch by the model's own `rotary_emb`, attention by
`scaled_dot_product_attention` with an additive padding mask built once). Where a layer's keys
and values go is the caller's: the decode loop's KV cache (`decode.py`), or the shared-prompt
passes of the teacher and the trainer (`shared_prompt.py`).

`kv_supported` says whether these functions reproduce a model's forward. Left out on purpose:
sliding-window attention, dynamic/longrope rotary scaling, logit softcapping, custom attention
functions, accelerate-dispatched models and forward hooks on the modules whose forward we
bypass (the model, decoder layers, attention, MLP): `kv_supported` names the reason and the
callers take the plain Hugging Face forward.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import torch
import torch.nn.functional as F
from transformers.activations import SiLUActivation

from opd.fast.packed import call_module
from opd.models import inner_model
from opd.types import position_ids

# model_type -> (transformers module, class prefix)
ARCHS = {
    "llama": ("llama", "Llama"),
    "qwen2": ("qwen2", "Qwen2"),
    "qwen3": ("qwen3", "Qwen3"),
    "mistral": ("mistral", "Mistral"),
}
# Rotary types whose cos/sin depend on the position only (no sequence-length-dependent update).
STATIC_ROPE = ("default", "linear", "llama3", "yarn")
# Attention implementations that all compute plain softmax attention (what we mirror).
PLAIN_ATTENTION = ("eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")
SILU = (SiLUActivation, torch.nn.SiLU)


def kv_supported(model) -> str | None:
    """None when the functions here reproduce `model`'s forward, else the reason they do not."""
    for name, cfg in (getattr(model, "peft_config", None) or {}).items():
        if getattr(cfg, "is_prompt_learning", False):
            return f"peft adapter {name!r} is prompt learning (virtual tokens)"
    m = inner_model(model)
    config = getattr(m, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHS:
        return f"model type {model_type!r} (supported: {', '.join(ARCHS)})"
    module_name, prefix = ARCHS[model_type]
    modeling = importlib.import_module(f"transformers.models.{module_name}.modeling_{module_name}")
    if type(m) is not getattr(modeling, f"{prefix}ForCausalLM"):
        return f"{type(m).__name__} is not {prefix}ForCausalLM"
    layers = list(m.model.layers[: config.num_hidden_layers])
    attns = [layer.self_attn for layer in layers]
    for layer, attn in zip(layers, attns, strict=True):
        if type(layer) is not getattr(modeling, f"{prefix}DecoderLayer"):
            return f"decoder layer {type(layer).__name__} is not {prefix}DecoderLayer"
        if type(attn) is not getattr(modeling, f"{prefix}Attention"):
            return f"attention {type(attn).__name__} is not {prefix}Attention"
        if type(layer.mlp) is not getattr(modeling, f"{prefix}MLP"):
            return f"MLP {type(layer.mlp).__name__} is not {prefix}MLP"
        if getattr(attn, "sliding_window", None) is not None:
            return "sliding-window attention"
    if model_type == "mistral" and getattr(config, "sliding_window", None) is not None:
        return f"sliding-window attention (sliding_window={config.sliding_window})"
    if getattr(config, "use_sliding_window", False) or any(
        t != "full_attention" for t in getattr(config, "layer_types", None) or []
    ):
        return "sliding-window attention (layer_types)"
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        if getattr(config, key, None):
            return f"{key}={getattr(config, key)}"
    rope_type = getattr(m.model.rotary_emb, "rope_type", None)
    if rope_type not in STATIC_ROPE:
        return f"rotary type {rope_type!r} (supported: {', '.join(STATIC_ROPE)})"
    impl = getattr(config, "_attn_implementation", None)
    if impl is not None and impl not in PLAIN_ATTENTION:
        return f"custom attention implementation {impl!r}"
    if len(set(getattr(m, "hf_device_map", {}).values())) > 1:
        return "the model is split across devices (hf_device_map)"
    bypassed = [model, m, m.model, *layers, *attns, *(layer.mlp for layer in layers)]
    for mod in bypassed:
        if mod._forward_hooks or mod._forward_pre_hooks:
            return f"forward hooks on {type(mod).__name__} (its forward is bypassed)"
    if any(hasattr(mod, "_hf_hook") for mod in m.modules()):
        return "accelerate hooks (offloaded or dispatched model)"
    return None


def rope(x_ALHD: torch.Tensor, cos_AL1D: torch.Tensor, sin_signed_AL1D: torch.Tensor):
    """HF's `x * cos + rotate_half(x) * sin`, with rotate_half's sign folded into the sin table."""
    return x_ALHD * cos_AL1D + x_ALHD.roll(x_ALHD.shape[-1] // 2, -1) * sin_signed_AL1D


def attend(q_AHLD, k_AKSD, v_AKSD, mask_A1LS, scale: float) -> torch.Tensor:
    """Softmax attention of L queries over S cached keys; returns (A * L, H * D).

    Grouped-query attention without copying the cache: the G query heads that share a kv head
    become G * L query rows against that head (HF's repeat_kv maps head h to kv head h // G).
    (Two batched matrix multiplies around a softmax were tried on the CPU: faster than SDPA in
    some processes, slower in others; `python benchmarks/hot_paths.py` shows which this
    machine gets.)
    """
    A, H, L, D = q_AHLD.shape
    K = k_AKSD.shape[1]
    G = H // K
    q_AKMD = q_AHLD.reshape(A, K, G * L, D)
    mask_A1MS = mask_A1LS
    if G > 1 and L > 1 and mask_A1LS.shape[2] != G * L:  # not repeated by the caller yet
        mask_A1MS = mask_A1LS.repeat(1, 1, G, 1)
    if L == 1 and q_AHLD.dtype in (torch.bfloat16, torch.float16) and q_AHLD.device.type == "cpu":
        out_AKMD = one_query_attention(q_AKMD, k_AKSD, v_AKSD, mask_A1MS, scale)
    else:
        out_AKMD = F.scaled_dot_product_attention(
            q_AKMD, k_AKSD, v_AKSD, attn_mask=mask_A1MS, scale=scale
        )
    if L == 1:  # (A, K, G, D) is already (A, H * D) in memory
        return out_AKMD.view(A, H * D)
    return out_AKMD.view(A, H, L, D).transpose(1, 2).reshape(A * L, H * D)


def one_query_attention(q_AKMD, k_AKSD, v_AKSD, mask_A1MS, scale: float) -> torch.Tensor:
    """A decode step's attention in lower precision on a CPU: two float32 products around a
    softmax, cast back. SDPA's CPU kernel is slower for one bf16 query (and the same as this in
    float32): `python benchmarks/hot_paths.py`, "decode step ... bf16", measures it."""
    s_AKMS = torch.matmul(q_AKMD.float(), k_AKSD.float().transpose(-1, -2))
    s_AKMS = s_AKMS.mul_(scale).add_(mask_A1MS.float())
    return torch.matmul(s_AKMS.softmax(-1), v_AKSD.float()).to(q_AKMD.dtype)


def mlp(module, h_ME: torch.Tensor, linear=call_module) -> torch.Tensor:
    """down(act(gate(h)) * up(h)), the Llama-family MLP. Without autograd the activation and the
    product are taken in place (two temporaries fewer)."""
    if torch.is_grad_enabled():  # autograd keeps the activation's input: nothing in place
        gate_MI = module.act_fn(linear(module.gate_proj, h_ME))
        return linear(module.down_proj, gate_MI * linear(module.up_proj, h_ME))
    g_MI = linear(module.gate_proj, h_ME)
    g_MI = F.silu(g_MI, inplace=True) if type(module.act_fn) in SILU else module.act_fn(g_MI)
    return linear(module.down_proj, g_MI.mul_(linear(module.up_proj, h_ME)))


# keys_values(k_AKLD, v_AKLD) -> (k_AKSD, v_AKSD): keeps a layer's new keys and values where its
# caller wants them (a KV cache, a list) and returns the S keys and values the queries attend over
KeysValues = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def decoder_layer(
    layer, x_ME, cos_AL1D, sin_AL1D, mask_A1LS, keys_values: KeysValues, last_only=False,
    linear=call_module,
):  # fmt: skip
    """One decoder layer on L new tokens per row (M = A * L rows of x, row-major): the one copy
    of the Llama-family layer, for decoding, teacher scoring and the trainer's forward.

    last_only: return the last token's output only (a prompt's last layer: (A, E)).
    linear(module, x) runs the projections (`packed.PackedLinears` for a frozen teacher).
    Differentiable when autograd is on (the trainer): nothing is written in place then, unless
    keys_values does so.
    """
    attn = layer.self_attn
    A, L = cos_AL1D.shape[:2]
    D = attn.head_dim
    h_ME = layer.input_layernorm(x_ME)
    q_ALHD = linear(attn.q_proj, h_ME).view(A, L, -1, D)
    k_ALKD = linear(attn.k_proj, h_ME).view(A, L, -1, D)
    v_ALKD = linear(attn.v_proj, h_ME).view(A, L, -1, D)
    if hasattr(attn, "q_norm"):  # Qwen3: per-head RMSNorm before the rotary embedding
        q_ALHD, k_ALKD = attn.q_norm(q_ALHD), attn.k_norm(k_ALKD)
    H = q_ALHD.shape[2]
    qk_ALXD = rope(torch.cat([q_ALHD, k_ALKD], 2), cos_AL1D, sin_AL1D)
    k_AKSD, v_AKSD = keys_values(qk_ALXD[:, :, H:].transpose(1, 2), v_ALKD.transpose(1, 2))
    q_AHLD = qk_ALXD[:, :, :H].transpose(1, 2)
    if last_only and L > 1:
        q_AHLD, mask_A1LS = q_AHLD[:, :, -1:], mask_A1LS[:, :, -1:]
        x_ME = x_ME.view(A, L, -1)[:, -1]
    x_ME = x_ME + linear(attn.o_proj, attend(q_AHLD, k_AKSD, v_AKSD, mask_A1LS, attn.scaling))
    return x_ME + mlp(layer.mlp, layer.post_attention_layernorm(x_ME), linear)


def into_cache(kv, start: int) -> KeysValues:
    """keys_values for a KV cache kv = (K_AKSD, V_AKSD): the new keys and values go to columns
    [start, start + L), and the queries attend over columns [0, start + L)."""
    k_AKSD, v_AKSD = kv

    def write(k_AKLD, v_AKLD):
        end = start + k_AKLD.shape[2]
        k_AKSD[:, :, start:end] = k_AKLD
        v_AKSD[:, :, start:end] = v_AKLD
        return k_AKSD[:, :, :end], v_AKSD[:, :, :end]

    return write


def additive(seen: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An additive attention mask: 0 where a key is seen, -inf where it is not.

    (SDPA on CPU converts a boolean mask on every call; this one is built once per batch.)
    """
    return torch.zeros(seen.shape, dtype=dtype, device=seen.device).masked_fill(~seen, -torch.inf)


def rotary_tables(core, x: torch.Tensor, S: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sign-folded sin (S, D) for positions 0..S-1 from the model's own rotary embedding."""
    cos_1SD, sin_1SD = core.rotary_emb(x, torch.arange(S, device=x.device)[None])
    sign_D = torch.ones(cos_1SD.shape[-1], dtype=sin_1SD.dtype, device=sin_1SD.device)
    sign_D[: cos_1SD.shape[-1] // 2] = -1
    return cos_1SD[0], sin_1SD[0] * sign_D


def prompt_tables(attention_BL, cos_SD, sin_SD, dtype):
    """For a pass over left-padded prompts: rotary cos/sin (B, L, 1, D) at their positions and
    the additive mask (B, 1, L, L), causal over real tokens. Every query also sees itself, so a
    pad query's row is never fully masked (a NaN there would reach the real rows through
    NaN * 0 in the attention's value sum)."""
    L, device = attention_BL.shape[1], attention_BL.device
    pos_BL = position_ids(attention_BL)
    eye_LL = torch.eye(L, dtype=torch.bool, device=device)
    seen_B1LL = ((eye_LL.new_ones(L, L).tril() & attention_BL.bool()[:, None, :]) | eye_LL)[:, None]
    return cos_SD[pos_BL][:, :, None], sin_SD[pos_BL][:, :, None], additive(seen_B1LL, dtype)


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


def prefill(model, tokens_BL, attention_BL, S: int, rows_R, linear=call_module):
    """Run the prompts, filling cache columns [0, L); returns (the last position's final-normed
    hidden state (B, E), the cache, cos, sin).

    rows_R: the cache gets R rows, row r holding prompt rows_R[r]'s keys and values (each
    prompt runs once for the rows that share it). The cache is one
    (layers, 2, R, kv_heads, S, head_dim) tensor: dropping rows is one index_select. Columns
    from L on are left unset: callers write a column before any query reads it.
    """
    core = model.model
    layers = core.layers[: model.config.num_hidden_layers]
    B, L = tokens_BL.shape
    x_BLE = core.embed_tokens(tokens_BL)
    cos_SD, sin_SD = rotary_tables(core, x_BLE, S)
    cos_BL1D, sin_BL1D, mask_B1LL = prompt_tables(attention_BL, cos_SD, sin_SD, x_BLE.dtype)
    kv_shape = (2, B, model.config.num_key_value_heads, L, layers[0].self_attn.head_dim)
    cache_Y2BKLD = x_BLE.new_empty((len(layers), *kv_shape))
    x_ME = x_BLE.view(B * L, -1)
    for y, layer in enumerate(layers):
        last = y == len(layers) - 1  # only K/V of the earlier positions are needed from here
        kv = into_cache(cache_Y2BKLD[y], 0)
        x_ME = decoder_layer(layer, x_ME, cos_BL1D, sin_BL1D, mask_B1LL, kv, last, linear)
    Y, _, _, K, _, D = cache_Y2BKLD.shape
    cache_Y2RKSD = x_BLE.new_empty((Y, 2, rows_R.shape[0], K, S, D))
    cache_Y2RKSD[..., :L, :] = cache_Y2BKLD[:, :, rows_R]  # only the prompt's columns are copied
    return core.norm(x_ME), cache_Y2RKSD, cos_SD, sin_SD
