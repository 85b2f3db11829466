"""In-process sampler for any Hugging Face causal LM: a batched decode loop over the model's cache.

Rows are left-padded prompts; every decode step feeds one token per row with explicit position
ids, samples from the (temperature / top-k / top-p adjusted) distribution and records the
log-prob of the sampled token under exactly that distribution. Finished rows keep decoding pad
tokens that are masked out (the batch stops once every row has hit EOS).

Left out on purpose (later backends): a preallocated static KV cache, dropping finished rows
from the batch, speculative decoding.
"""

from __future__ import annotations

import functools
import inspect

import torch

from opd.data import Prompt
from opd.models import inner_model
from opd.types import Rollouts, position_ids


@functools.cache
def _cache_kwarg(cls) -> str:
    # transformers 5.2x renamed `past_key_values` to `cache`; accept both.
    params = inspect.signature(cls.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def sample_token(
    logits_BV: torch.Tensor,
    generator: torch.Generator,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per row; return (token_B, logprob_B) under the distribution sampled from.

    temperature 0 is greedy (log-prob of the raw distribution). With top-k / top-p the log-prob is
    that of the renormalised, truncated distribution, which is what the sampler really used.
    """
    logits_BV = logits_BV.float()
    if temperature == 0:
        token_B = logits_BV.argmax(-1)
        return token_B, torch.log_softmax(logits_BV, -1).gather(-1, token_B[:, None]).squeeze(-1)
    logits_BV = logits_BV / temperature
    neg_inf = torch.finfo(logits_BV.dtype).min
    if top_k > 0 and top_k < logits_BV.shape[-1]:
        kth_B1 = torch.topk(logits_BV, top_k, dim=-1).values[:, -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth_B1, neg_inf)
    if top_p < 1.0:
        sorted_BV, order_BV = torch.sort(logits_BV, dim=-1, descending=True)
        probs_BV = torch.softmax(sorted_BV, -1)
        # drop a token when the tokens ranked above it already cover top_p (the top one stays)
        drop_BV = (probs_BV.cumsum(-1) - probs_BV) >= top_p
        drop_BV = torch.zeros_like(drop_BV).scatter(-1, order_BV, drop_BV)
        logits_BV = logits_BV.masked_fill(drop_BV, neg_inf)
    logp_BV = torch.log_softmax(logits_BV, -1)
    token_B = inverse_cdf_sample(logp_BV, generator)
    return token_B, logp_BV.gather(-1, token_B[:, None]).squeeze(-1)


def inverse_cdf_sample(logp_BV: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One token per row from log-probs, by one uniform draw against the cumulative distribution.

    Exactly torch.multinomial's distribution, but one random number per row instead of work per
    vocabulary entry: on a CPU, multinomial over 64 x 32k entries costs ~47 ms, this ~5 ms. The
    cumulative sum is float64, so rounding cannot move a boundary by more than ~1e-16 of mass;
    right=True never returns a zero-probability token (its cumulative value equals the one
    before it).
    """
    cdf_BV = logp_BV.exp().cumsum(-1, dtype=torch.float64)
    u_B1 = torch.rand(
        (logp_BV.shape[0], 1), generator=generator, dtype=torch.float64, device=logp_BV.device
    )
    token_B1 = torch.searchsorted(cdf_BV, u_B1 * cdf_BV[:, -1:], right=True)
    return token_B1.squeeze(-1).clamp_(max=logp_BV.shape[-1] - 1)


class HFSampler:
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
        self.model = model
        self.pad_id = pad_id
        self.stop_ids = stop_ids
        self.vocab_size = vocab_size
        self.max_new_tokens = max_new_tokens
        self.temperature, self.top_p, self.top_k = temperature, top_p, top_k

    def sample(
        self, prompts_P: list[Prompt], group_size: int, generator: torch.Generator
    ) -> Rollouts:
        with torch.inference_mode():
            out = self._decode([p.ids for p in prompts_P], group_size, generator)
        # Plain tensors again (inference tensors cannot enter the trainer's autograd graph).
        return Rollouts(**{k: v.clone() if torch.is_tensor(v) else v for k, v in out.items()})

    def _decode(
        self, prompts_P: list[list[int]], group_size: int, generator: torch.Generator
    ) -> dict:
        model = inner_model(self.model)
        device = next(model.parameters()).device
        prompt_index_B = torch.arange(len(prompts_P)).repeat_interleave(group_size)
        rows = [prompts_P[i] for i in prompt_index_B.tolist()]
        B, Lp, N = len(rows), max(len(r) for r in rows), self.max_new_tokens

        tokens_BT = torch.full((B, Lp + N), self.pad_id, dtype=torch.long, device=device)
        attention_BT = torch.zeros((B, Lp + N), dtype=torch.long, device=device)
        for b, row in enumerate(rows):
            tokens_BT[b, Lp - len(row) : Lp] = torch.tensor(row, device=device)
            attention_BT[b, Lp - len(row) : Lp] = 1
        completion_BT = torch.zeros((B, Lp + N), dtype=torch.bool, device=device)
        sampler_lp_BT = torch.zeros((B, Lp + N), dtype=torch.float32, device=device)
        stop_ids = torch.tensor(self.stop_ids, device=device)
        finished_B = torch.zeros(B, dtype=torch.bool, device=device)

        was_training = model.training
        model.eval()
        cache_kw = _cache_kwarg(type(model))
        pos_BT = position_ids(attention_BT[:, :Lp])
        out = model(
            input_ids=tokens_BT[:, :Lp],
            attention_mask=attention_BT[:, :Lp],
            position_ids=pos_BT,
            use_cache=True,
        )
        cache = getattr(out, cache_kw)
        next_pos_B = pos_BT[:, -1] + 1
        n_new = 0
        for i in range(N):
            col = Lp + i
            token_B, lp_B = sample_token(
                out.logits[:, -1, : self.vocab_size],
                generator,
                self.temperature,
                self.top_k,
                self.top_p,
            )
            alive_B = ~finished_B
            tokens_BT[:, col] = torch.where(alive_B, token_B, self.pad_id)
            sampler_lp_BT[:, col] = torch.where(alive_B, lp_B, 0.0)
            completion_BT[:, col] = alive_B
            attention_BT[:, col] = alive_B.long()
            finished_B |= torch.isin(token_B, stop_ids)
            n_new = i + 1
            if i == N - 1 or bool(finished_B.all()):
                break
            out = model(
                input_ids=tokens_BT[:, col : col + 1],
                attention_mask=attention_BT[:, : col + 1],
                position_ids=next_pos_B[:, None],
                use_cache=True,
                **{cache_kw: cache},
            )
            cache = getattr(out, cache_kw)
            next_pos_B = next_pos_B + 1
        model.train(was_training)

        T = Lp + n_new
        return dict(
            tokens_BT=tokens_BT[:, :T],
            attention_mask_BT=attention_BT[:, :T],
            completion_mask_BT=completion_BT[:, :T],
            prompt_len=Lp,
            sampler_lp_BT=sampler_lp_BT[:, :T],
            prompt_index_B=prompt_index_B,
        )
