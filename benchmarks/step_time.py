"""Seconds per `opd distill` step on the issue's reference work, with the per-phase breakdown.

64 samples (16 prompts x 4) x up to 40 new tokens, a 0.4M-parameter student (Llama, hidden 128,
2 layers) and a 3.2M teacher (hidden 256, 4 layers), a ~20-token character vocabulary, fp32,
randomly initialised. The sampler never draws EOS (fixed_length.py), so every completion is
exactly 40 tokens: the measured work is 64 x 40 completion tokens, as the issue states it. `--allow-eos` measures natural lengths.

    python benchmarks/step_time.py [--steps 12] [--warmup 2] [--threads 2] [--allow-eos]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import random
import statistics
import tempfile
from pathlib import Path

import torch
from fixed_length import never_sample_eos  # benchmarks/, beside this file
from floor import gemm_peak, parts_floor_flops
from transformers.utils import logging as hf_logging

from opd import tiny
from opd.build import build_run as setup_run
from opd.config import build_config
from opd.distributed import setup
from opd.train import train_step


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=40)
    ap.add_argument("--allow-eos", action="store_true", help="let completions end at EOS")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    hf_logging.disable_progress_bar()
    root = Path(tempfile.mkdtemp(prefix="opd-bench-"))
    tok = tiny.char_tokenizer(chars="0123456789+=,;:.")
    student = tiny.tiny_model(
        tok, hidden=128, layers=2, heads=4, kv_heads=4, intermediate=352, seed=0
    )
    teacher = tiny.tiny_model(
        tok, hidden=256, layers=4, heads=8, kv_heads=8, intermediate=704, seed=1
    )
    n_student = sum(p.numel() for p in student.parameters())
    n_teacher = sum(p.numel() for p in teacher.parameters())
    tiny.save(student, tok, root / "student")
    tiny.save(teacher, tok, root / "teacher")
    rng = random.Random(0)
    (root / "prompts.jsonl").write_text(
        "".join(
            json.dumps({"prompt": f"{rng.randint(100, 999)}+{rng.randint(100, 999)}="}) + "\n"
            for _ in range(256)
        )
    )
    cfg = build_config(
        None,
        {
            "model.student": str(root / "student"),
            "model.teacher": str(root / "teacher"),
            "data.prompts": str(root / "prompts.jsonl"),
            "run.out": str(root / "run"),
            "run.steps": args.warmup + args.steps,
            "data.batch_prompts": 16,
            "sampling.group_size": 4,
            "sampling.max_new_tokens": args.max_new_tokens,
            "optim.lr": 1e-4,
            "run.save_every": 10_000,
            "run.threads": args.threads,
            "run.device": "cpu",
        },
        [],
    )
    ctx = setup("cpu", args.threads)
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        parts = setup_run(cfg, ctx)
    if not args.allow_eos:
        never_sample_eos(tok.eos_token_id)
    rows = [train_step(step, parts) for step in range(args.warmup + args.steps)][args.warmup :]

    def med(key):
        return statistics.median(r[key] for r in rows)

    times = sorted(r["time/step"] for r in rows)
    print(
        f"student {n_student / 1e6:.2f}M params, teacher {n_teacher / 1e6:.2f}M params, "
        f"vocab {len(tok)}, {args.threads} threads, torch {torch.__version__}"
    )
    print(
        f"64 samples x <= {args.max_new_tokens} new tokens; median completion "
        f"{med('tokens/mean_completion_len'):.1f} tokens; {len(rows)} timed steps after {args.warmup} warm-up"
    )
    print(f"step   {med('time/step'):.3f} s median (min {times[0]:.3f}, max {times[-1]:.3f})")
    for phase in ("sample", "teacher", "train"):
        print(f"  {phase:<8}{med('time/' + phase):.3f} s")
    print(f"throughput {med('throughput/tokens_per_s'):.0f} completion tokens/s")
    batch = parts.sampler.sample(parts.prompts[:16], 4, torch.Generator().manual_seed(0))
    peak = gemm_peak(torch.float32, args.threads)
    for once in (False, True):
        floor = parts_floor_flops(parts, batch, prompts_once=once)
        floor_s = sum(floor.values()) / peak
        print(
            f"compute floor{', prompts once' if once else ''} {floor_s:.3f} s "
            f"({sum(floor.values()) / 1e9:.1f} GFLOP at a measured {peak / 1e9:.0f} GFLOP/s "
            f"fp32 GEMM peak): step = {med('time/step') / floor_s:.2f}x floor"
        )


if __name__ == "__main__":
    main()
