"""Steps and FLOPs to a held-out accuracy target, read from run folders' metrics.jsonl.

    python benchmarks/steps_to_target.py --target 0.95 DIR/opd-seed0 DIR/rl-seed0 ...

For run folders that no results.json sums up (benchmarks/two_paths_distill.py's, or those of an
`opd experiment math` stopped early): one row per run, the first evaluation at or above the target (as math counts it: the step, and the run's
cumulative FLOPs there), and the last evaluation.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from opd.experiments.blog import _curve, _first_reaching, _metrics


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", type=float, required=True, help="held-out accuracy, e.g. 0.95")
    ap.add_argument("runs", nargs="+", type=Path)
    args = ap.parse_args()
    print("| run | steps to target | FLOPs to target | last evaluation |")
    print("|---|---|---|---|")
    for run in args.runs:
        curve = _curve(_metrics(run))  # as math reads it: [step, cumulative FLOPs, accuracy]
        step, flops = _first_reaching(curve, args.target)
        reached = f"{step} | {flops:.3g}" if step is not None else "not reached | not reached"
        step, _, acc = curve[-1]
        print(f"| {run.name} | {reached} | {acc:.1%} at step {step} |")


if __name__ == "__main__":
    main()
