"""In-process sampler with a preallocated KV cache for the Llama family (`llama.kv_supported`).

Same rows and log-probs as `samplers.hf.HFSampler` (left-padded prompts, `draw.sample_token`
semantics), but the decode loop is ours: one (layers, K/V, B, kv_heads, Lp + max_new_tokens,
head_dim) cache written in place by `llama.decoder_layer`; each prompt prefilled once for its
whole group; finished rows dropped from the batch once a quarter of the active rows have hit a
stop id. On a CPU, a wide plain LM head runs through a oneDNN copy of its weight packed once per
batch (`packed.py`).

Left out on purpose: CUDA graphs, torch.compile, paged or prefix-shared attention (the G rows
of a prompt each read their own copy of its K/V).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from opd.data import Prompt, left_pad
from opd.draw import sample_token
from opd.errors import OpdError
from opd.fast.heads import plain_head
from opd.fast.llama import additive, decoder_layer, into_cache, kv_supported, prefill
from opd.fast.packed import PackedLinears, call_module
from opd.fast.upcast import slow_half
from opd.models import inner_model
from opd.types import Rollouts

PACK_HEAD_MIN = 1 << 20  # LM-head weights at least this large are packed for decoding (1M)


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
        # short multiplies gain nothing from it, unless its half weights are multiplied in
        # float32 (upcast.py): then one float32 copy each serves the whole batch
        head = plain_head(model)
        wide = head is not None and head.weight.numel() >= PACK_HEAD_MIN
        head_linear = PackedLinears(only=[head]) if wide else call_module
        half = device.type == "cpu" and slow_half(core.embed_tokens.weight.dtype)
        body = PackedLinears() if half else call_module
        hidden_PE, cache_Y2AKSD, cos_SD, sin_SD = prefill(
            model, prompt_PL, attention_PL, Lp + N, rows_A, body
        )
        logits_AV = head_linear(model.lm_head, hidden_PE)[rows_A]
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
                x_AE = decoder_layer(
                    layer, x_AE, cos_A11D, sin_A11D, mask_A11C, into_cache(kv, Lp + i), linear=body
                )
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
