"""The CPU choices inside opd's decode loop, teacher scoring and LM-head chunks, each timed
against the plain alternative on the shapes of benchmarks/vs_trl.py (fp32, 2 threads).

    attention   SDPA's fused CPU kernel (what `fast.llama.attend` runs) vs two batched matrix
                multiplies around a softmax, tried and left out: from one process to the next
                it was either much faster or much slower (the small pair's teacher pass, 64
                rows x 8 heads, 31 completion queries over 40 keys; a decode step, 64 x 4
                heads, 1 query). In bf16 a decode step's one query goes the other way:
                SDPA vs `fast.llama.one_query_attention` (float32 products), which attend
                runs there.
    head chunk  512 x 256 hidden states times a 32k x 256 LM head: into a fresh tensor (what
                `h @ W.T` does) vs `heads.head_logits`, into a buffer reused from call to call.
    packed      `F.linear` vs `packed.PackedLinears` (oneDNN, weight packed once) for a decode
                step's LM head (64 x 256 @ 256 x 32k) and a teacher MLP projection
                (1984 x 256 @ 256 x 704).
    draw        one token per row of 64 x 32k probabilities: torch.multinomial, one float64
                cumulative sum over the row, and `draw.inverse_cdf_sample` (two levels).
    log-softmax a 512 x 32k chunk of logits (teacher scoring, the trainer's fused loss):
                separate amax / sub / exp / sum passes (what opd did before) vs
                `heads.log_softmax_chunk`, torch's row kernel in place.
    token       a decode step's draw from 64 x 32k logits with its log-prob: amax, exp of the
                shifted logits, the draw on unnormalised mass (before) vs softmax's row kernel
                and the draw (`samplers.hf.sample_token`).

    half        with --half: a bf16 linear's forward and backward (the real pair's MLP,
                752 x 576 @ 576 x 1536) through torch's bf16 kernels vs `upcast.linear`
                (float32 multiplies; what the fast paths run on a CPU without bf16 kernels).

The variants of each row alternate for --rounds rounds (at most 3 for --half); the median is
printed.

    python benchmarks/hot_paths.py [--rounds 15] [--threads 2] [--half]
"""

from __future__ import annotations

import argparse
import statistics
import time
from functools import partial

import torch
import torch.nn.functional as F

from opd.draw import inverse_cdf_sample, sample_token
from opd.fast.heads import head_logits, log_softmax_chunk
from opd.fast.llama import one_query_attention
from opd.fast.packed import PackedLinears
from opd.fast.upcast import linear as upcast_linear
from opd.fast.upcast import slow_half


def timed(variants: dict, rounds: int, repeat: int) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in variants}
    for fn in variants.values():  # warm-up: first-call dispatch, buffers
        fn()
    for _ in range(rounds):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            for _ in range(repeat):
                fn()
            times[name].append((time.perf_counter() - t0) / repeat)
    return {name: statistics.median(ts) for name, ts in times.items()}


def sdpa(q_AHLD, k_AKSD, v_AKSD, mask_A1LS, scale):  # what fast.llama.attend runs
    return F.scaled_dot_product_attention(q_AHLD, k_AKSD, v_AKSD, attn_mask=mask_A1LS, scale=scale)


def bmm_softmax(q_AHLD, k_AKSD, v_AKSD, mask_A1LS, scale):  # tried, not used (unstable)
    A, H, L, D = q_AHLD.shape
    S = k_AKSD.shape[2]
    s_XLS = torch.baddbmm(
        mask_A1LS.expand(A, H, L, S).reshape(A * H, L, S),
        q_AHLD.reshape(A * H, L, D),
        k_AKSD.reshape(A * H, S, D).transpose(1, 2),
        alpha=scale,
    )
    return torch.bmm(s_XLS.softmax(-1), v_AKSD.reshape(A * H, S, D))


def one_query_case(rounds: int) -> tuple[str, dict[str, float]]:
    """A bf16 decode step: SDPA vs `fast.llama.one_query_attention` (what attend runs)."""
    g = torch.Generator().manual_seed(0)
    A, K, S, D = 64, 4, 40, 32
    q, k, v = (torch.randn(A, K, n, D, generator=g).bfloat16() for n in (1, S, S))
    mask = torch.zeros(A, 1, 1, S, dtype=torch.bfloat16)
    with torch.inference_mode():
        return (
            "decode step 64x4 heads, 1 query x 40 keys, bf16",
            timed(
                {
                    "SDPA": partial(sdpa, q, k, v, mask, D**-0.5),
                    "opd float32 products": partial(one_query_attention, q, k, v, mask, D**-0.5),
                },
                rounds,
                200,
            ),
        )


def attention_cases(rounds: int) -> list[tuple[str, dict[str, float]]]:
    out = []
    g = torch.Generator().manual_seed(0)
    for label, (A, H, L, S) in {
        "teacher pass 64x8 heads, 31 queries x 40 keys": (64, 8, 31, 40),
        "decode step 64x4 heads, 1 query x 40 keys": (64, 4, 1, 40),
    }.items():
        D = 32  # laid out as in the decoder: q from a (A, L, H, D) projection, K/V in a cache
        q = torch.randn(A, L, H, D, generator=g).transpose(1, 2)
        k, v = torch.randn(2, A, H, S + 8, D, generator=g)[..., :S, :].unbind(0)
        mask = torch.zeros(A, 1, L, S)
        causal = torch.ones(L, L, dtype=torch.bool).tril()
        mask[..., S - L :] = torch.zeros(L, L).masked_fill(~causal, -torch.inf)
        with torch.inference_mode():
            out.append(
                (
                    label,
                    timed(
                        {
                            "SDPA (opd)": partial(sdpa, q, k, v, mask, D**-0.5),
                            "bmm-softmax-bmm": partial(bmm_softmax, q, k, v, mask, D**-0.5),
                        },
                        rounds,
                        20 if L > 1 else 200,
                    ),
                )
            )
    return out


def head_case(rounds: int) -> tuple[str, dict[str, float]]:
    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(512, 256, generator=g), torch.randn(32_000, 256, generator=g)

    def fresh():
        return h @ w.T

    with torch.inference_mode():
        return "head chunk 512 x 256 @ 256 x 32k", timed(
            {"fresh tensor": fresh, "opd scratch": partial(head_logits, h, w)}, rounds, 2
        )


def packed_cases(rounds: int) -> list[tuple[str, dict[str, float]]]:
    out = []
    for label, (M, K, N) in {
        "decode LM head 64 x 256 @ 256 x 32k": (64, 256, 32_000),
        "teacher MLP 1984 x 256 @ 256 x 704": (1984, 256, 704),
    }.items():
        torch.manual_seed(0)
        lin, x, packed = torch.nn.Linear(K, N, bias=False), torch.randn(M, K), PackedLinears()
        with torch.inference_mode():
            out.append(
                (
                    label,
                    timed(
                        {"F.linear": partial(lin, x), "opd packed": partial(packed, lin, x)},
                        rounds,
                        5,
                    ),
                )
            )
    return out


def half_case(rounds: int) -> tuple[str, dict[str, float]]:
    """A bf16 linear's forward and backward on the real pair's MLP shape (benchmarks/pairs.py)."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(576, 1536, bias=False).bfloat16()
    x = torch.randn(752, 576).bfloat16().requires_grad_()
    g = torch.randn(752, 1536).bfloat16()

    def run(linear):
        linear(lin, x).backward(g)

    label = f"bf16 linear fwd+bwd 752 x 576 @ 576 x 1536 (slow_half: {slow_half(torch.bfloat16)})"
    variants = {"module (torch's bf16)": partial(run, torch.nn.Module.__call__)}
    variants["opd upcast (float32)"] = partial(run, upcast_linear)
    return label, timed(variants, min(rounds, 3), 1)


def draw_case(rounds: int) -> tuple[str, dict[str, float]]:
    g = torch.Generator().manual_seed(0)
    p_BV = torch.softmax(3 * torch.randn(64, 32_000, generator=g), -1)

    def cumsum():
        cdf = p_BV.cumsum(-1, dtype=torch.float64)
        u = torch.rand((64, 1), generator=g, dtype=torch.float64)
        return torch.searchsorted(cdf, u * cdf[:, -1:], right=True)

    return "draw 64 x 32k", timed(
        {
            "multinomial": lambda: torch.multinomial(p_BV, 1, generator=g),
            "float64 cumsum": cumsum,
            "opd two-level": lambda: inverse_cdf_sample(p_BV, g),
        },
        rounds,
        5,
    )


def log_softmax_case(rounds: int) -> tuple[str, dict[str, float]]:
    g = torch.Generator().manual_seed(0)
    z0, tok = 3 * torch.randn(512, 32_000, generator=g), torch.randint(0, 32_000, (512, 1))
    z = torch.empty_like(z0)

    def passes():  # the token log-probs by separate passes, in place as opd did
        picked = z.copy_(z0).gather(-1, tok)
        m = z.amax(-1, keepdim=True)
        return picked - m - z.sub_(m).exp_().sum(-1, keepdim=True).log()

    def row_kernel():
        return log_softmax_chunk(z.copy_(z0)).gather(-1, tok)

    with torch.inference_mode():
        return "log-softmax 512 x 32k (with a copy in)", timed(
            {"copy only": lambda: z.copy_(z0), "passes": passes, "opd row kernel": row_kernel},
            rounds,
            3,
        )


def token_case(rounds: int) -> tuple[str, dict[str, float]]:
    g = torch.Generator().manual_seed(0)
    z = 3 * torch.randn(64, 32_000, generator=g)

    def passes():  # what sample_token did before
        m = z.amax(-1, keepdim=True)
        token, mass = inverse_cdf_sample((z - m).exp_(), g)
        return token, z.gather(-1, token[:, None]).squeeze(-1) - m.squeeze(-1) - mass.log()

    with torch.inference_mode():
        return "decode draw + log-prob 64 x 32k", timed(
            {"passes": passes, "opd softmax": partial(sample_token, z, g)}, rounds, 5
        )


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--half", action="store_true", help="also a bf16 linear, torch's vs upcast")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cases = [
        *attention_cases(args.rounds),
        one_query_case(args.rounds),
        head_case(args.rounds),
        *packed_cases(args.rounds),
        draw_case(args.rounds),
        log_softmax_case(args.rounds),
        token_case(args.rounds),
        *([half_case(args.rounds)] if args.half else []),
    ]
    print(f"| case | variant | ms (median of {args.rounds}) |\n|---|---|---|")
    for label, result in cases:
        for name, seconds in result.items():
            print(f"| {label} | {name} | {seconds * 1e3:.3f} |")


if __name__ == "__main__":
    main()
