"""The trainer with and without running each distinct prompt once, in one process.

`opd distill` steps on benchmarks/vs_trl.py's pairs and settings (16 prompts x 4 completions of
exactly 32 tokens, fp32, 2 threads), switching the trainer's shared-prompt forward
(`opd.prompt_sharing`) on and off every --steps steps for --rounds rounds, in alternating
order, after 2 warm-up steps. Prints the median training phase and whole step of each. (The
sampler and teacher share prompts either way.)

    python benchmarks/prompt_sharing.py [--pairs large,small] [--rounds 8] [--steps 3]
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

import opd.loop as loop
from opd.config import build_config
from opd.distributed import setup


def run(pair: str, rounds: int, steps: int, threads: int) -> dict[bool, list[dict]]:
    root = vs_trl.CACHE / f"pair-{pair}"
    if not (root / "prompts.jsonl").exists():
        vs_trl.build_pair(pair, root)
    overrides = {
        "model.student": str(root / "student"),
        "model.teacher": str(root / "teacher"),
        "data.prompts": str(root / "prompts.jsonl"),
        "data.batch_prompts": vs_trl.BATCH_PROMPTS,
        "sampling.group_size": vs_trl.GROUP,
        "sampling.max_new_tokens": 32,
        "optim.lr": vs_trl.LR,
        "run.out": str(Path(tempfile.mkdtemp(prefix="opd-sharing-")) / "run"),
        "run.steps": 2 + 2 * rounds * steps,
        "run.threads": threads,
        "run.device": "cpu",
        "run.preflight": False,
    }
    ctx = setup("cpu", threads)
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        parts = loop.setup_run(build_config(None, overrides, []), ctx)
    never_sample_eos(parts.tokenizer.eos_token_id)
    shared_hidden = loop.shared_prompt_hidden
    step = 0
    for step in range(2):  # warm-up
        loop.train_step(step, parts)
    rows: dict[bool, list[dict]] = {True: [], False: []}
    for r in range(rounds):
        for on in (True, False) if r % 2 == 0 else (False, True):
            loop.shared_prompt_hidden = shared_hidden if on else (lambda *a: None)
            for _ in range(steps):
                step += 1
                rows[on].append(loop.train_step(step, parts))
    loop.shared_prompt_hidden = shared_hidden
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--pairs", default="large,small")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    for pair in args.pairs.split(","):
        rows = run(pair, args.rounds, args.steps, args.threads)
        for on in (True, False):
            train = statistics.median(m["time/train"] for m in rows[on])
            step = statistics.median(m["time/step"] for m in rows[on])
            label = "prompts once" if on else "every row   "
            print(
                f"{pair:<6} {label}  train {train:.3f} s  step {step:.3f} s  ({len(rows[on])} steps)"
            )


if __name__ == "__main__":
    main()
