"""In-process sampler with a preallocated KV cache for Llama, Qwen2, Qwen3 and Mistral models.

Same rows and log-probs as `HFSampler` (left-padded prompts, `sample_token` semantics), but the
decode loop is ours: one (layers, K/V, B, kv_heads, Lp + max_new_tokens, head_dim) cache written
in place; attention by `scaled_dot_product_attention` over the cache with an additive padding
mask built once; rotary cos/sin tabled once per batch by the model's own `rotary_emb`; each
prompt prefilled once for its whole group; finished rows dropped from the batch once a quarter
of the active rows have hit a stop id. Everything but the attention arithmetic and the MLP's
product (its activation and product are taken in place) is the model's own submodules
(embedding, norms, q/k/v/o and MLP projections, the activation, Qwen3's q_norm/k_norm, LM head),
so weights are shared and peft's LoRA layers apply. On a CPU, a wide plain LM head (1M weights
or more) runs through a oneDNN copy of its weight packed once per batch (`opd.packed`).

Left out on purpose: sliding-window attention, dynamic/longrope rotary scaling, logit
softcapping, custom attention functions, accelerate-dispatched models and forward hooks on the
modules whose forward we bypass (the model, decoder layers, attention, MLP): `kv_supported`
names the reason and `make_sampler` falls back to `HFSampler`. Also no CUDA graphs,
torch.compile, paged or prefix-shared attention (the G rows of a prompt each read their own
copy of its K/V).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from transformers.activations import SiLUActivation

from opd.data import Prompt
from opd.errors import OpdError
from opd.heads import plain_head
from opd.models import inner_model
from opd.packed import PackedLinears, call_module
from opd.samplers.hf import sample_token
from opd.types import Rollouts, position_ids

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
PACK_HEAD_MIN = 1 << 20  # LM-head weights at least this large are packed for decoding (1M)


def kv_supported(model) -> str | None:
    """None when KVCacheSampler reproduces `model`'s forward, else the reason it does not."""
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
    (Two batched matrix multiplies around a softmax were tried on the CPU: in some processes
    1.8x faster than SDPA for the teacher's 31 x 40 rows, in others 1.6x slower;
    `python benchmarks/hot_paths.py` shows which this machine gets.)
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
    softmax, cast back. SDPA's CPU kernel takes about 3x as long for one bf16 query (and the
    same as this in float32): `python benchmarks/hot_paths.py`, "decode step ... bf16"."""
    s_AKMS = torch.matmul(q_AKMD.float(), k_AKSD.float().transpose(-1, -2))
    s_AKMS = s_AKMS.mul_(scale).add_(mask_A1MS.float())
    return torch.matmul(s_AKMS.softmax(-1), v_AKSD.float()).to(q_AKMD.dtype)


def mlp(module, h_ME: torch.Tensor, linear=call_module) -> torch.Tensor:
    """down(act(gate(h)) * up(h)), the Llama-family MLP, without its two temporaries: the
    activation and the product are taken in place (inference only)."""
    g_MI = linear(module.gate_proj, h_ME)
    g_MI = F.silu(g_MI, inplace=True) if type(module.act_fn) in SILU else module.act_fn(g_MI)
    return linear(module.down_proj, g_MI.mul_(linear(module.up_proj, h_ME)))


def decoder_layer(
    layer, x_ME, cos_AL1D, sin_AL1D, mask_A1LS, kv, start: int, last_only=False, linear=call_module
):
    """One decoder layer on L new tokens per row (M = A * L rows of x, row-major).

    Their keys and values go to cache columns [start, start + L) of kv = (K_AKSD, V_AKSD).
    last_only: return the last token's output only (the prompt's last layer: (A, E)).
    linear(module, x) runs the projections (`packed.PackedLinears` for a frozen teacher).
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
    k_AKSD, v_AKSD = kv
    end = start + L
    k_AKSD[:, :, start:end] = qk_ALXD[:, :, H:].transpose(1, 2)
    v_AKSD[:, :, start:end] = v_ALKD.transpose(1, 2)
    q_AHLD = qk_ALXD[:, :, :H].transpose(1, 2)
    if last_only and L > 1:
        q_AHLD, mask_A1LS = q_AHLD[:, :, -1:], mask_A1LS[:, :, -1:]
        x_ME = x_ME.view(A, L, -1)[:, -1]
    o_MF = attend(q_AHLD, k_AKSD[:, :, :end], v_AKSD[:, :, :end], mask_A1LS, attn.scaling)
    x_ME = x_ME + linear(attn.o_proj, o_MF)
    return x_ME + mlp(layer.mlp, layer.post_attention_layernorm(x_ME), linear)


def left_pad(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens_BL, attention_BL): prompts right-aligned to the longest, as HFSampler lays them."""
    L = max(len(r) for r in rows)
    tokens_BL = torch.full((len(rows), L), pad_id, dtype=torch.long)
    attention_BL = torch.zeros((len(rows), L), dtype=torch.long)
    for b, row in enumerate(rows):
        tokens_BL[b, L - len(row) :] = torch.tensor(row)
        attention_BL[b, L - len(row) :] = 1
    return tokens_BL.to(device), attention_BL.to(device)


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


def prefill(
    model, tokens_BL, attention_BL, S: int, head: bool = True, rows_R=None, linear=call_module
):
    """Run the prompts, filling cache columns [0, L); returns (last logits_BV, cache, cos, sin).

    head=False returns the last position's final-normed hidden state (B, E) instead of logits.
    rows_R: the cache gets R rows, row r holding prompt rows_R[r]'s keys and values (each
    prompt runs once for the rows that share it); default one row per prompt.

    The cache is one (layers, 2, R, kv_heads, S, head_dim) tensor: dropping rows is one
    index_select. Columns from L on are left unset: callers write a column before any query
    reads it. Every query also sees itself, so a pad query's row is never fully masked (a NaN
    there would reach the real rows through NaN * 0 in the attention's value sum).
    """
    core = model.model
    layers = core.layers[: model.config.num_hidden_layers]
    B, L = tokens_BL.shape
    x_BLE = core.embed_tokens(tokens_BL)
    cos_SD, sin_SD = rotary_tables(core, x_BLE, S)
    pos_BL = position_ids(attention_BL)
    eye_LL = torch.eye(L, dtype=torch.bool, device=x_BLE.device)
    causal_LL = torch.ones_like(eye_LL).tril()
    seen_B1LL = ((causal_LL & attention_BL.bool()[:, None, :]) | eye_LL)[:, None]
    mask_B1LL = additive(seen_B1LL, x_BLE.dtype)
    kv_shape = (2, B, model.config.num_key_value_heads, L, layers[0].self_attn.head_dim)
    cache_Y2BKLD = x_BLE.new_empty((len(layers), *kv_shape))
    cos_BL1D, sin_BL1D = cos_SD[pos_BL][:, :, None], sin_SD[pos_BL][:, :, None]
    x_ME = x_BLE.view(B * L, -1)
    for y, layer in enumerate(layers):
        last = y == len(layers) - 1  # only K/V of the earlier positions are needed from here
        x_ME = decoder_layer(
            layer, x_ME, cos_BL1D, sin_BL1D, mask_B1LL, cache_Y2BKLD[y], 0, last, linear
        )
    out = core.norm(x_ME)
    if rows_R is None:
        rows_R = torch.arange(B, device=x_BLE.device)
    Y, _, _, K, _, D = cache_Y2BKLD.shape
    cache_Y2RKSD = x_BLE.new_empty((Y, 2, rows_R.shape[0], K, S, D))
    cache_Y2RKSD[..., :L, :] = cache_Y2BKLD[:, :, rows_R]  # only the prompt's columns are copied
    return linear(model.lm_head, out) if head else out, cache_Y2RKSD, cos_SD, sin_SD


@dataclass
class Active:
    """Decode state of the A rows still in the batch; every field is indexed by row on dim 0."""

    rows_A: torch.Tensor  # the rows' indices in the batch
    token_A: torch.Tensor  # the last sampled token
    finished_A: torch.Tensor  # sampled a stop id (still in the batch until enough have)
    tokens_AN: torch.Tensor  # sampled tokens, one column per step
    lp_AN: torch.Tensor  # their sampler log-probs
    cos_AN1D: torch.Tensor  # rotary tables at each step's position (positions skip padding)
    sin_AN1D: torch.Tensor
    mask_A11S: torch.Tensor  # additive mask over cache columns (-inf on prompt padding)

    @staticmethod
    def start(attention_BL, N: int, cos_SD, sin_SD, pad_id: int) -> Active:
        (B, Lp), device = attention_BL.shape, attention_BL.device
        pos_BN = attention_BL.sum(-1, keepdim=True) + torch.arange(N, device=device)
        seen_B11S = torch.ones((B, 1, 1, Lp + N), dtype=torch.bool, device=device)
        seen_B11S[:, 0, 0, :Lp] = attention_BL.bool()
        return Active(
            rows_A=torch.arange(B, device=device),
            token_A=torch.full((B,), pad_id, device=device),
            finished_A=torch.zeros(B, dtype=torch.bool, device=device),
            tokens_AN=torch.full((B, N), pad_id, device=device),
            lp_AN=torch.zeros((B, N), dtype=torch.float32, device=device),
            cos_AN1D=cos_SD[pos_BN][:, :, None],
            sin_AN1D=sin_SD[pos_BN][:, :, None],
            mask_A11S=additive(seen_B11S, cos_SD.dtype),
        )

    def select(self, rows: torch.Tensor) -> Active:
        return Active(**{f.name: getattr(self, f.name)[rows] for f in fields(self)})


class KVCacheSampler:
    def __init__(
        self,
        model,
        pad_id: int,
        stop_ids: list[int],
        vocab_size: int,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
    ):
        reason = kv_supported(model)
        if reason is not None:
            raise OpdError(f"sampling.backend=kv does not support this model: {reason}")
        self.model = model
        self.pad_id = pad_id
        self.stop_ids = stop_ids
        self.vocab_size = vocab_size
        self.max_new_tokens = max_new_tokens
        self.temperature, self.top_p, self.top_k = temperature, top_p, top_k
        # Steps between looks at which rows finished: every step on a CPU (free there); on a
        # GPU each look waits for the queued kernels, so every 8th step (finished rows decode
        # a few pad steps more, masked out like the rows that finish between drops).
        device = next(inner_model(model).parameters()).device
        self.check_every = 1 if device.type == "cpu" else 8

    def sample(
        self, prompts_P: list[Prompt], group_size: int, generator: torch.Generator
    ) -> Rollouts:
        model = inner_model(self.model)
        was_training = model.training
        model.eval()
        try:
            with torch.inference_mode():
                out = self._decode([p.ids for p in prompts_P], group_size, generator)
        finally:
            model.train(was_training)
        # Plain tensors again (inference tensors cannot enter the trainer's autograd graph).
        return Rollouts(**{k: v.clone() if torch.is_tensor(v) else v for k, v in out.items()})

    def _decode(
        self, prompts_P: list[list[int]], group_size: int, generator: torch.Generator
    ) -> dict:
        model = inner_model(self.model)
        core = model.model
        layers = core.layers[: model.config.num_hidden_layers]
        device = core.embed_tokens.weight.device
        G, N = group_size, self.max_new_tokens
        prompt_PL, attention_PL = left_pad(prompts_P, self.pad_id, device)
        Lp = prompt_PL.shape[1]
        # Each prompt runs once; its G rows (prompt-major) share the prefilled cache and logits.
        rows_A = torch.arange(len(prompts_P), device=device).repeat_interleave(G)
        # a wide LM head is packed once for all the decode steps (packed.py); the body's
        # short multiplies gain nothing from it
        head = plain_head(model)
        wide = head is not None and head.weight.numel() >= PACK_HEAD_MIN
        head_linear = PackedLinears(only=[head]) if wide else call_module
        logits_PV, cache_Y2AKSD, cos_SD, sin_SD = prefill(
            model, prompt_PL, attention_PL, Lp + N, rows_R=rows_A, linear=head_linear
        )
        logits_AV = logits_PV[rows_A]
        prompt_BL = prompt_PL.repeat_interleave(G, 0)
        attention_BL = attention_PL.repeat_interleave(G, 0)
        s = Active.start(attention_BL, N, cos_SD, sin_SD, self.pad_id)
        stop_ids = torch.tensor(self.stop_ids, device=device)
        dropped = []  # the rows that left the batch
        n_new = 0
        for i in range(N):
            s.token_A, lp_A = sample_token(
                logits_AV[:, : self.vocab_size], generator, self.temperature, self.top_k, self.top_p
            )
            s.tokens_AN[:, i], s.lp_AN[:, i] = s.token_A, lp_A  # what follows a stop: see assemble
            s.finished_A |= torch.isin(s.token_A, stop_ids)
            n_new = i + 1
            if i == N - 1:
                break
            if n_new % self.check_every == 0:  # reading finished_A is a host sync on a GPU
                A, n_done = s.finished_A.shape[0], int(s.finished_A.sum())
                if n_done == A:
                    break
                if 4 * n_done >= A:  # a quarter of the rows finished: dropping them pays
                    dropped.append(s.select(s.finished_A))
                    keep_A = (~s.finished_A).nonzero().squeeze(1)
                    s, cache_Y2AKSD = s.select(keep_A), cache_Y2AKSD.index_select(2, keep_A)
            x_AE = core.embed_tokens(s.token_A)
            cos_A11D, sin_A11D = s.cos_AN1D[:, i : i + 1], s.sin_AN1D[:, i : i + 1]
            mask_A11C = s.mask_A11S[..., : Lp + i + 1]
            for layer, kv in zip(layers, cache_Y2AKSD, strict=True):
                x_AE = decoder_layer(layer, x_AE, cos_A11D, sin_A11D, mask_A11C, kv, Lp + i)
            logits_AV = head_linear(model.lm_head, core.norm(x_AE))

        parts = [*dropped, s]  # every row once, in the order they left the batch
        order_B = torch.cat([p.rows_A for p in parts]).argsort()
        tokens_BN = torch.cat([p.tokens_AN for p in parts])[order_B, :n_new]
        lp_BN = torch.cat([p.lp_AN for p in parts])[order_B, :n_new]
        rollout = assemble(prompt_BL, attention_BL, tokens_BN, lp_BN, stop_ids, self.pad_id)
        return dict(**rollout, prompt_index_B=torch.arange(len(prompts_P)).repeat_interleave(G))


def assemble(prompt_BL, attention_BL, tokens_BN, lp_BN, stop_ids, pad_id: int) -> dict:
    """Rollouts fields from the prompts and the raw samples of every decode step.

    A sampled token belongs to the completion when no stop id came before it in its row;
    everything after (samples of finished rows that were still in the batch, never-written
    columns of dropped rows) becomes pad with log-prob 0 and mask 0, as in HFSampler.
    """
    stop_BN = torch.isin(tokens_BN, stop_ids).long()
    completion_BN = (stop_BN.cumsum(-1) - stop_BN) == 0
    # steps taken after every row had stopped (finished rows are looked at every few steps on a
    # GPU) hold no completion token: cut them, so the width is the longest completion
    n_keep = int(completion_BN.sum(1).max()) if completion_BN.numel() else 0
    tokens_BN, lp_BN, completion_BN = (
        tokens_BN[:, :n_keep],
        lp_BN[:, :n_keep],
        completion_BN[:, :n_keep],
    )
    return dict(
        tokens_BT=torch.cat([prompt_BL, tokens_BN.masked_fill(~completion_BN, pad_id)], 1),
        attention_mask_BT=torch.cat([attention_BL, completion_BN.long()], 1),
        completion_mask_BT=torch.cat([torch.zeros_like(attention_BL).bool(), completion_BN], 1),
        prompt_len=prompt_BL.shape[1],
        sampler_lp_BT=torch.cat(
            [torch.zeros_like(prompt_BL).float(), lp_BN.masked_fill(~completion_BN, 0.0)], 1
        ),
    )
