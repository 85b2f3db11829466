"""opd's fast paths on and off (`run.fast_paths`), in one process, phase by phase.

`opd distill` steps on benchmarks/vs_trl.py's pairs and settings (16 prompts x 4 completions of
exactly 32 tokens, fp32, 2 threads): two runs are built from the same models, one with
run.fast_paths=true (KV-cache decoding, shared prompts in the teacher and the trainer, the
fused chunked LM head, packed linears) and one with run.fast_paths=false (the plain Hugging
Face forward everywhere); they take turns every --steps steps for --rounds rounds, in
alternating order, after 2 warm-up steps each. Prints the median of each phase and of the
whole step, with min-max, for both. Both runs sample the same prompts with the same seeds.

    python benchmarks/fast_paths.py [--pairs large,small] [--rounds 4] [--steps 3]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import tempfile
from pathlib import Path

import vs_trl  # benchmarks/, beside this file
from fixed_length import never_sample_eos
from pairs import GROUP, PAIRS, build_pair

from opd.build import build_run
from opd.config import build_config
from opd.distributed import setup
from opd.train import train_step

PHASES = ("sample", "teacher", "train", "step")


def run(pair: str, rounds: int, steps: int, threads: int) -> dict[bool, list[dict]]:
    root = build_pair(pair)
    overrides = {
        "model.student": str(root / "student"),
        "model.teacher": str(root / "teacher"),
        "data.prompts": str(root / "prompts.jsonl"),
        "data.batch_prompts": PAIRS[pair]["batch_prompts"],
        "sampling.group_size": GROUP,
        "sampling.max_new_tokens": 32,
        "optim.lr": vs_trl.LR,
        "run.out": str(Path(tempfile.mkdtemp(prefix="opd-fast-paths-")) / "run"),
        "run.steps": 2 + rounds * steps,
        "run.threads": threads,
        "run.device": "cpu",
        "run.preflight": False,
    }
    ctx = setup("cpu", threads)
    runs = {}
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        for on in (True, False):
            cfg = build_config(None, overrides | {"run.fast_paths": on}, [])
            runs[on] = build_run(cfg, ctx)
    never_sample_eos(runs[True].tokenizer.eos_token_id)
    rows: dict[bool, list[dict]] = {True: [], False: []}
    for on in (True, False):
        for step in range(2):  # warm-up
            train_step(step, runs[on])
    step = {True: 2, False: 2}
    for r in range(rounds):
        for on in (True, False) if r % 2 == 0 else (False, True):
            for _ in range(steps):
                rows[on].append(train_step(step[on], runs[on]))
                step[on] += 1
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--pairs", default="large,small")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    print("| pair | run.fast_paths | " + " | ".join(f"{p} s" for p in PHASES) + " |")
    print("|---|---|" + "---|" * len(PHASES))
    for pair in args.pairs.split(","):
        rows = run(pair, args.rounds, args.steps, args.threads)
        for on in (True, False):
            cells = []
            for phase in PHASES:
                values = [m[f"time/{phase}"] for m in rows[on]]
                cells.append(
                    f"{statistics.median(values):.3f} ({min(values):.3f}-{max(values):.3f})"
                )
            print(f"| {pair} | {str(on).lower()} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
