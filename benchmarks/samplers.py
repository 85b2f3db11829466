"""Seconds to sample 16 prompts x 4 completions of exactly N tokens, per sampler backend.

The small pair's student of benchmarks/step_time.py and vs_trl.py (Llama h128 L2, 0.4M
parameters, a character vocabulary), fp32, EOS masked so every row decodes N tokens; the
backends alternate, and the median of the runs after two warm-up rounds is printed.

    python benchmarks/samplers.py [--new-tokens 32] [--rounds 12] [--threads 2]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch
from fixed_length import never_sample_eos  # benchmarks/, beside this file

from opd import tiny
from opd.data import Prompt
from opd.samplers import make_sampler


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tok = tiny.char_tokenizer(chars="0123456789+=,;:.")
    model = tiny.tiny_model(tok, hidden=128, layers=2, heads=4, kv_heads=4, intermediate=352)

    never_sample_eos(tok.eos_token_id)
    rng = random.Random(0)
    prompts = [
        Prompt(
            ids=tok(f"{rng.randint(100, 999)}+{rng.randint(100, 999)}=")["input_ids"],
            row={},
            where="",
        )
        for _ in range(16)
    ]
    samplers = {
        b: make_sampler(model, tok, len(tok), args.new_tokens, backend=b) for b in ("hf", "kv")
    }
    times: dict[str, list[float]] = {b: [] for b in samplers}
    for r in range(args.rounds + 2):
        for name, sampler in samplers.items():
            t0 = time.perf_counter()
            sampler.sample(prompts, 4, torch.Generator().manual_seed(r))
            times[name].append(time.perf_counter() - t0)
    for name, ts in times.items():
        ts = ts[2:]
        print(
            f"{name}: {statistics.median(ts):.4f} s median (min {min(ts):.4f}) for 64 x {args.new_tokens} tokens"
        )


if __name__ == "__main__":
    main()
