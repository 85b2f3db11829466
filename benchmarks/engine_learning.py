"""Does a run that samples on vLLM learn as one that samples in process? The demo's task (4-digit
addition traces, its cached teacher and SFT student), OPD from the SFT checkpoint for --steps
steps, held-out accuracy every 10 steps, for sampling.backend=kv (in-process), vllm
(staleness 0) and vllm one-step-off (staleness 1, objective.tis_cap=2) with k_t from the
trained policy (objective.stale_kl=trainer, the default) and from the sampler
(stale_kl=sampler), each on --seeds.

    OPD_VLLM_VENV=~/.cache/opd/vllm-venv python benchmarks/engine_learning.py \
        [--steps 50] [--seeds 0,1,2] [--engine-cpus 1] [--lr 3e-4] [--cache-dir DIR]

The teacher and SFT student come from `opd demo`'s cache (trained there first when missing,
about 7 minutes); one engine serves every vLLM run (each run syncs the SFT weights to it
before its first sample). Prints each run's accuracy curve and, per sampler, the median
(min-max) final accuracy over the seeds.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from opd.engine import leave_cores, parse_cpus, serve_vllm
from opd.experiments.demo import _stage, prepare
from opd.experiments.demo_settings import Settings
from opd.samplers.vllm import ENGINE_ARGS, ENGINE_ENV


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--lr", type=float, default=None, help="OPD's learning rate (the demo's)")
    ap.add_argument("--engine-cpus", default="", help="cores for the engine; this process the rest")
    ap.add_argument("--cache-dir", default=None, help="opd demo's cache (default ~/.cache/opd)")
    ap.add_argument("--out", default="/tmp/opd-engine-learning")
    args = ap.parse_args()
    st = prepare(Settings(), 0, args.cache_dir, True, lambda msg: print(msg, flush=True))
    s = Settings(opd_lr=args.lr or Settings.opd_lr)  # the stages do not depend on opd_lr
    print(f"teacher {st.teacher_acc:.1%}, SFT student {st.sft_acc:.1%} held-out")
    longest = 64 + st.max_new
    with serve_vllm(st.sft, None, "student", max_model_len=longest, extra_args=ENGINE_ARGS,
                    env_extra=ENGINE_ENV, cpus=args.engine_cpus) as url:  # fmt: skip
        if args.engine_cpus:
            torch.set_num_threads(leave_cores(parse_cpus(args.engine_cpus, "--engine-cpus")))
        runs = {
            "kv (in-process)": {"sampling.backend": "kv"},
            "vllm, staleness 0": {"sampling.backend": "vllm", "sampling.urls": url},
            "vllm, staleness 1": {"sampling.backend": "vllm", "sampling.urls": url,
                                  "sampling.staleness": 1, "objective.tis_cap": 2.0},
            "vllm, staleness 1, k_t from the sampler": {
                "sampling.backend": "vllm", "sampling.urls": url, "sampling.staleness": 1,
                "objective.tis_cap": 2.0, "objective.stale_kl": "sampler"},
        }  # fmt: skip
        finals: dict[str, list[float]] = {name: [] for name in runs}
        print(f"\n{args.steps} OPD steps of {s.opd_prompts} prompts x {s.opd_group}, lr {s.opd_lr}")
        print("| sampler | seed | held-out accuracy at steps 0, 10, ... | s/step |")
        print("|---|---|---|---|")
        for seed in [int(x) for x in args.seeds.split(",")]:
            for name, extra in runs.items():
                folder = f"{len(finals[name])}-{list(runs).index(name)}-seed{seed}"
                curve, step_s = one_run(st, s, Path(args.out) / folder, seed, args.steps, extra)
                finals[name].append(curve[-1])
                points = " ".join(f"{a:.1%}" for a in curve)
                print(f"| {name} | {seed} | {points} | {step_s:.2f} |", flush=True)
    print("\n| sampler | final accuracy, median (min-max) |\n|---|---|")
    for name, accs in finals.items():
        print(f"| {name} | {statistics.median(accs):.1%} ({min(accs):.1%}-{max(accs):.1%}) |")


def one_run(st, s: Settings, out: Path, seed: int, steps: int, extra: dict):
    """(held-out accuracy at steps 0, 10, ..., median seconds a step)."""
    flags = {
        **st.common, "run.seed": seed,
        "model.student": str(st.sft), "model.teacher": str(st.teacher),
        "data.prompts": str(st.prompts), "run.out": str(out), "run.steps": steps,
        "data.batch_prompts": s.opd_prompts, "sampling.group_size": s.opd_group,
        "optim.lr": s.opd_lr, "eval.every": 10, "run.save_every": steps, **extra,
    }  # fmt: skip
    _stage(flags, quiet=True, force=True)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    curve = [r["eval/accuracy"] for r in rows if "eval/accuracy" in r]
    return curve, statistics.median(r["time/step"] for r in rows if "time/step" in r)


if __name__ == "__main__":
    main()
