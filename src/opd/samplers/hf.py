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

from opd.data import Prompt, left_pad
from opd.draw import sample_token
from opd.models import inner_model
from opd.types import Rollouts, position_ids


@functools.cache
def _cache_kwarg(cls) -> str:
    # transformers 5.2x renamed `past_key_values` to `cache`; accept both.
    params = inspect.signature(cls.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


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

        prompt_BL, attention_BL = left_pad(rows, self.pad_id, device)
        tokens_BT = torch.cat([prompt_BL, prompt_BL.new_full((B, N), self.pad_id)], 1)
        attention_BT = torch.cat([attention_BL, attention_BL.new_zeros((B, N))], 1)
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
