"""Can the demo's teacher learn two valid ways to write a sum? (issue 17's several-paths lead)

    python benchmarks/two_paths.py --out /tmp/two-paths [--paths both|direct|sums|trace+sums|trace]
        [--steps 1000] [--hidden 128 --layers 4]

Trains the demo's teacher (a Llama h128/L4 from scratch, the demo's teacher settings) on
the demo's 4-digit addition where every training problem is written both ways (`--paths both`): the
column trace ("1+2+0=03,7+6+0=13,...") and the sum written at once, least significant digit
first ("=33390", `Addition.direct`); `--paths direct` trains on the direct form alone;
`--paths sums` on the column sums without the operands (",03,13,13,09", `Addition.sums`: the
carry stays in sight), `--paths trace+sums` on the trace and the sums, `--paths trace` on the
trace alone. Then prints, for greedy and temperature-1 decoding of the 200 held-out problems,
how many took each path and how many of those were right (one verifier,
`extract_either_answer`). `--layers 2` trains the demo's student's shape instead (h128/L2).

The lead needs a teacher that samples between two paths it executes well and a student that
executes one of them worse; this measures the first half.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from opd import tiny
from opd.evaluate import evaluate
from opd.experiments.demo import _train_from_scratch, _write_jsonl
from opd.experiments.demo_settings import PATHS as DEMO_PATHS
from opd.experiments.demo_settings import TEACHER_SCHEDULE, Settings
from opd.tasks.addition import CHARS, Addition, extract_either_answer

EXTRACT = "opd.tasks.addition:extract_either_answer"
PATHS = {  # --paths: the ways each training problem is written (Addition's methods)
    "both": ("solution", "direct"),
    "direct": ("direct",),
    "sums": ("sums",),
    **DEMO_PATHS,  # "trace" and "trace+sums", as `--task two-paths` writes them
}


def by_path(model: Path, test: Path, out: Path, temperature: float, max_new: int) -> str:
    evaluate(str(model), str(test), out=str(out), max_new_tokens=max_new, extractor=EXTRACT,
             temperature=temperature)  # fmt: skip
    counts = {"trace": [0, 0], "direct": [0, 0], "sums": [0, 0]}
    for row in map(json.loads, out.read_text().splitlines()):
        path = {"=": "direct", ",": "sums"}.get(row["completion"].strip()[:1], "trace")
        counts[path][0] += 1
        counts[path][1] += extract_either_answer(row["completion"]) == row["answer"]
    right, rows = (sum(c[i] for c in counts.values()) for i in (1, 0))
    return (
        f"| {temperature:g} | {right / rows:.1%} | "
        + " | ".join(f"{n} / {ok}" for n, ok in counts.values())
        + " |"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--paths", choices=list(PATHS), default="both")
    demo = Settings()  # the demo's teacher, unless the flags say otherwise
    ap.add_argument("--steps", type=int, default=demo.teacher_steps)
    ap.add_argument("--hidden", type=int, default=demo.teacher_hidden)
    ap.add_argument("--layers", type=int, default=demo.teacher_layers)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    task = Addition(demo.digits, answer_line=False)
    ways = [getattr(task, way) for way in PATHS[args.paths]]
    train = _write_jsonl(out / "train.jsonl", [
        {"prompt": task.prompt(a, b), "completion": way(a, b)}
        for a, b in task.pairs(demo.n_train, "train") for way in ways
    ])  # fmt: skip
    test = _write_jsonl(out / "test.jsonl", task.rows(demo.n_test, "test"))
    max_new = len(task.solution(0, 0)) + 2  # the longest path
    flags = {
        "data.prompts": str(train), "run.steps": args.steps,
        "data.batch_prompts": demo.teacher_batch, "sampling.max_new_tokens": max_new,
        "optim.lr": demo.teacher_lr, **TEACHER_SCHEDULE, "run.seed": 0,
    }  # fmt: skip
    stage = out / "teacher"
    shutil.rmtree(stage, ignore_errors=True)  # always train: the stage helper would reuse it
    plan = f"teacher h{args.hidden}/L{args.layers}, {args.steps} steps on --paths {args.paths}"
    _train_from_scratch(stage, tiny.char_tokenizer(chars=CHARS), args.hidden, args.layers, 0,
                        False, flags, print, "teacher", plan)  # fmt: skip
    teacher = stage / "final"
    print(
        "| temperature | accuracy | trace: taken / right | direct: taken / right | sums: taken / right |"
    )
    print("|---|---|---|---|---|")
    for temperature in (0.0, 1.0):
        print(by_path(teacher, test, out / f"eval-t{temperature:g}.jsonl", temperature, max_new))


if __name__ == "__main__":
    main()
