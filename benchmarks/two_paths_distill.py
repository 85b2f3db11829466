"""A teacher with two paths, a student that executes one worse: OPD vs continued SFT (issue 17).

    python benchmarks/two_paths.py --out /tmp/tp --paths trace+sums      # the teacher
    python benchmarks/two_paths_distill.py --teacher /tmp/tp/teacher/final --out /tmp/tpd \
        --data ~/.cache/opd/demo/data-030d69cd7544 sweep                   # rates, validation
    python benchmarks/two_paths_distill.py ... compare --sft-lr 3e-4 --opd-lr 3e-4  # 3 seeds, test

The teacher writes each sum two ways and samples between them: the column trace
("1+2+0=03,...") and the column sums alone (",03,13,13,09", `Addition.sums`). The student (the
demo's h128/L2) learns the sums far more slowly than the trace. Its start is SFT on the teacher's
samples until 30% validation accuracy (the demo's SFT stage, `extract_either_answer` scoring
either path). From there, each method runs 32 prompts x 4 samples a step:

- continued SFT on the teacher's samples (forward KL: it keeps covering both paths);
- OPD with the blog's per-token advantage (`objective.discount=0`): at the token that picks the
  path, reverse KL pulls the student toward the teacher's own split;
- OPD with sequence-level credit (`objective.discount=1`): every token's advantage is the sum
  of the reverse KL still to come, so the token that picks a path the student then executes
  badly carries that path's KL, and the student can settle on the path it executes well.

`sweep` runs continued SFT and OPD with sequence-level credit at 1e-4, 3e-4 and 1e-3 (seed 100,
the validation split); `compare` runs every method at the given rates, seeds 0-2, on the test
split, each until 95% of the teacher's test accuracy or its budget, and prints steps to the
target and each run's final greedy path counts.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from two_paths import by_path

from opd import tiny
from opd.evaluate import evaluate
from opd.experiments.blog import _curve, _first_reaching, _metrics
from opd.experiments.demo import _stage, _train_from_scratch
from opd.experiments.demo_settings import Settings
from opd.tasks.addition import CHARS

EXTRACT = "opd.tasks.addition:extract_either_answer"
METHODS = {
    "sft": {"objective.kind": "sft"},
    "opd": {"objective.kind": "opd"},
    "opd-seq": {"objective.kind": "opd", "objective.discount": 1.0},
}


def run(args, name: str, lr: float, seed: int, split: str, steps: int, target: float) -> list:
    out = Path(args.out) / f"{name}-lr{lr:g}-seed{seed}"
    _stage({
        **METHODS[name], "model.teacher": args.teacher, "model.student": str(args.student),
        "data.prompts": str(args.data / "prompts.jsonl"), "run.out": str(out),
        "run.steps": steps, "run.save_every": steps, "run.seed": seed, "run.preflight": False,
        "data.batch_prompts": 32, "sampling.group_size": 4, "sampling.max_new_tokens": 37,
        "optim.lr": lr, "eval.prompts": str(args.data / f"{split}.jsonl"), "eval.every": 10,
        "eval.extractor": EXTRACT, "eval.stop_at": target,
    }, True, force=True)  # fmt: skip
    curve = _curve(_metrics(out))  # as math reads it: [step, cumulative FLOPs, accuracy]
    paths = by_path(out / "final", args.data / f"{split}.jsonl", out / "paths.jsonl", 0.0, 37)
    reached, _ = _first_reaching(curve, target)
    print(f"{name} lr {lr:g} seed {seed}: steps to {target:.1%} {reached or 'not reached'}; "
          f"accuracy at steps 0, 10, ...: {' '.join(f'{c[2]:.3f}' for c in curve)}")  # fmt: skip
    print(f"  final greedy paths {paths}")
    return [reached, curve[-1][2]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", required=True, help="two_paths.py --paths trace+sums's teacher")
    ap.add_argument("--data", required=True, type=Path, help="the demo's data folder")
    ap.add_argument("--out", required=True)
    ap.add_argument("phase", choices=["sweep", "compare"])
    ap.add_argument("--sft-lr", type=float, default=3e-4)
    ap.add_argument("--opd-lr", type=float, default=3e-4)
    ap.add_argument("--steps", type=int, default=300, help="compare's step budget")
    ap.add_argument(
        "--methods", default=",".join(METHODS), help="compare's methods, comma-separated"
    )
    s = Settings()
    ap.add_argument("--hidden", type=int, default=s.student_hidden, help="the student's width")
    ap.add_argument("--layers", type=int, default=s.student_layers, help="the student's depth")
    args = ap.parse_args()
    stage = Path(args.out) / "sft-start"
    _train_from_scratch(stage, tiny.char_tokenizer(chars=CHARS), args.hidden, args.layers, 1,
                        True, {
        "model.teacher": args.teacher, "data.prompts": str(args.data / "prompts.jsonl"),
        "run.steps": s.sft_steps, "data.batch_prompts": s.sft_batch, "optim.lr": s.sft_lr,
        "eval.prompts": str(args.data / "valid.jsonl"), "eval.every": s.sft_eval_every,
        "eval.stop_at": s.sft_stop_at, "eval.extractor": EXTRACT, "run.seed": 0,
        "sampling.max_new_tokens": 37, "run.preflight": False,
    }, print, "SFT start", "SFT start: the demo's student on the teacher's samples")  # fmt: skip
    args.student = stage / "final"
    test = str(args.data / "test.jsonl")
    teacher = evaluate(args.teacher, test, max_new_tokens=37, extractor=EXTRACT)["accuracy"]
    target = 0.95 * teacher
    start = by_path(args.student, args.data / "test.jsonl", stage / "paths.jsonl", 0.0, 37)
    print(f"teacher {teacher:.1%}, target {target:.1%}; start: {start}")
    if args.phase == "sweep":
        for name in ("sft", "opd-seq"):
            for lr in (1e-4, 3e-4, 1e-3):
                run(args, name, lr, 100, "valid", 150, target)
        return
    lrs = {"sft": args.sft_lr, "opd": args.opd_lr, "opd-seq": args.opd_lr}
    for name in args.methods.split(","):
        got = [run(args, name, lrs[name], seed, "test", args.steps, target) for seed in (0, 1, 2)]
        steps = [float("inf") if r is None else r for r, _ in got]
        print(f"{name}: median steps to target {statistics.median(steps)}, "
              f"median final {statistics.median(a for _, a in got):.1%}")  # fmt: skip


if __name__ == "__main__":
    main()
