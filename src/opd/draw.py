"""Drawing one token per row from a model's next-token logits, and its log-prob under the
distribution actually drawn from: the one definition every sampler uses."""

from __future__ import annotations

import torch


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
    if temperature != 1.0:
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
    # torch's row kernel (max, exp-sum and scale with the row in cache): a third less time than
    # separate amax / sub / exp passes at 64 x 32k. A drawn token's probability is never 0 (a
    # zero-mass entry cannot be drawn), so its log is finite.
    p_BV = torch.softmax(logits_BV, -1)
    token_B, _ = inverse_cdf_sample(p_BV, generator)
    return token_B, p_BV.gather(-1, token_B[:, None]).squeeze(-1).log()


def inverse_cdf_sample(
    p_BV: torch.Tensor, generator: torch.Generator, block: int = 1024
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row in proportion to p_BV (>= 0, unnormalised); returns (token_B, the
    row's total mass_B in float64).

    One uniform draw per row against the cumulative distribution, in two levels: the draw
    first picks a block of `block` entries by the blocks' cumulative mass, then an entry
    inside that block. torch.multinomial's distribution, with one pass over the vocabulary
    instead of multinomial's work per entry or a full float64 cumulative sum
    (`python benchmarks/hot_paths.py`). A block's mass is summed in float32 (relative error
    ~1e-7, the precision of the float32 probabilities themselves), the cumulative sums in
    float64. A zero-mass entry or block is never picked: the search takes the first cumulative
    value above the draw, and the draw stays below the picked block's own total.
    """
    B, V = p_BV.shape
    n_full = V // block * block if V > block else 0
    sums = [p_BV[:, :n_full].unflatten(1, (-1, block)).sum(-1)] if n_full else []
    if n_full < V:
        sums.append(p_BV[:, n_full:].sum(-1, keepdim=True))
    cdf_BN = torch.cat(sums, 1).double().cumsum(-1)  # (B, blocks)
    u_B1 = torch.rand((B, 1), generator=generator, dtype=torch.float64, device=p_BV.device)
    draw_B1 = u_B1 * cdf_BN[:, -1:]
    blk_B1 = torch.searchsorted(cdf_BN, draw_B1, right=True).clamp_(max=cdf_BN.shape[1] - 1)
    before_B1 = torch.where(blk_B1 > 0, cdf_BN.gather(1, (blk_B1 - 1).clamp(min=0)), 0.0)
    width = block if n_full else V
    col_BK = blk_B1 * block + torch.arange(width, device=p_BV.device)
    inside_BK = col_BK < V  # the last block may be short
    w_BK = p_BV.gather(1, col_BK.clamp(max=V - 1)).double().masked_fill_(~inside_BK, 0.0)
    inner_BK = w_BK.cumsum(-1)
    # below the block's own total (its sum and this cumulative sum may round apart)
    rest_B1 = torch.minimum(
        draw_B1 - before_B1, torch.nextafter(inner_BK[:, -1:], torch.zeros_like(before_B1))
    )
    k_B1 = torch.searchsorted(inner_BK, rest_B1, right=True).clamp_(max=width - 1)
    return col_BK.gather(1, k_B1).squeeze(-1), cdf_BN[:, -1]
