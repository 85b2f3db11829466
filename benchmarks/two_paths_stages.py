"""The two-path demo's stages under other settings, and OPD from them on the validation split

    python benchmarks/two_paths_stages.py --seeds 1,3 --cache-dir DIR --out DIR
        [--set sft_lr=3e-3 --set sft_stop_at=0.3 ...] [--opd objective.discount=0.8 ...]

Builds (or reuses from the cache, as `opd demo` does) the data, teacher and SFT stages of
`opd demo --task two-paths` for each seed, with `--set FIELD=VALUE` overriding the demo's
settings (`opd.experiments.demo_settings.Settings`); prints, on the held-out problems, how many
took each path and how many of those were right: the teacher's temperature-1 samples, and the
SFT student's greedy answers.
Then runs the demo's OPD stage from that checkpoint once per `--opd` (space-separated flags for
`opd distill` on top of the demo's; none: the demo's own) and prints its validation accuracy
every 10 steps (so that choosing settings never looks at the held-out split) and, at the end,
its greedy held-out accuracy and paths.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from opd.experiments.demo import _stage, opd_flags, prepare
from opd.experiments.demo_settings import settings_for

sys.path.insert(0, str(Path(__file__).parent))
from two_paths import by_path  # noqa: E402


def _value(base, field: str, text: str):
    """--set's value, typed like the Settings field it replaces."""
    kind = type(getattr(base, field))
    return text.lower() in ("1", "true") if kind is bool else kind(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--cache-dir", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE")
    ap.add_argument("--opd", action="append", default=[], metavar="'KEY=VALUE ...'")
    ap.add_argument("--steps", type=int, help="OPD steps (default: the demo's)")
    args = ap.parse_args()
    base = settings_for("default", "two-paths")
    fields = {f.name for f in dataclasses.fields(base)}
    over = {}
    for item in args.set:
        field, _, text = item.partition("=")
        if field not in fields:
            ap.error(f"--set {item}: no Settings field {field!r}")
        over[field] = _value(base, field, text)
    s = dataclasses.replace(base, **over)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"settings: the demo's, with {over}" if over else "settings: the demo's")
    for seed in map(int, args.seeds.split(",")):
        st = prepare(s, seed, args.cache_dir, True, lambda msg, seed=seed: print(seed, msg))
        row = by_path(st.teacher, st.test, out / f"teacher-seed{seed}.jsonl", 1.0, st.max_new)
        print(f"seed {seed}: teacher at temperature 1 | accuracy | trace | direct | sums")
        print(f"seed {seed}: {row}")
        row = by_path(st.sft, st.test, out / f"sft-seed{seed}.jsonl", 0.0, st.max_new)
        print(f"seed {seed}: SFT {st.sft_steps} steps; greedy | accuracy | trace | direct | sums")
        print(f"seed {seed}: {row}")
        for extra in args.opd or [""]:
            flags = dict(kv.split("=", 1) for kv in extra.split())
            steps = args.steps or s.opd_steps
            run = out / f"opd-seed{seed}-{'-'.join(extra.split()) or 'demo'}"
            scored_on_valid = {"eval.prompts": str(st.valid), "eval.every": 10}
            _stage({**opd_flags(st, run, steps), **scored_on_valid, **flags}, True, force=True)
            rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
            curve = " ".join(f"{m['eval/accuracy']:.1%}" for m in rows if "eval/accuracy" in m)
            print(f"seed {seed}: OPD {extra or '(the demo)'}: validation every 10 steps: {curve}")
            end = by_path(run / "final", st.test, out / f"{run.name}.jsonl", 0.0, st.max_new)
            print(f"seed {seed}: OPD {extra or '(the demo)'}: held-out at the end: {end}")


if __name__ == "__main__":
    main()
