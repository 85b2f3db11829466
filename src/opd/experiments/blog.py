"""`opd experiment`: the blog's comparisons, on the demo's task, teacher and SFT checkpoint.

- math: from one SFT checkpoint, on-policy distillation (the blog's sampled-token estimator, the
  full-vocabulary reverse KL, and generalized JSD) vs RL (0/1 answer reward) vs continued SFT
  on the teacher's samples, the same number of sampled sequences per step, several seeds;
  steps and FLOPs to reach 95% of the teacher's accuracy.
- lr-sweep: each of math's methods at every learning rate of a grid, one seed, scored on the
  validation split (never the test split math reports); math's per-method learning rates are
  the ones this picks (the fewest steps to the target). A method whose pick is the grid's
  lowest or highest rate runs the next rate past it (up to `sweep_extend` more), so that a
  pick is never just where the grid happened to end.
- single-prompt: on-policy distillation on one training prompt, many rollouts a step.
- self-distill: the teacher is the starting student itself; SFT on its own samples vs OPD
  against itself, held-out accuracy and KL to the starting model over steps.

Every run is an ordinary `opd distill` / `opd sft` / `opd rl` run under DIR/<experiment>/, so
its metrics.jsonl (with the FLOPs ledger) is there to inspect. Tiny models are learning-rate
sensitive, so every method gets its own learning rate, picked by `lr-sweep` (see the settings).
"""

from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import asdict, replace
from pathlib import Path

from opd.errors import OpdError
from opd.experiments.demo import Stages, _stage, prepare
from opd.experiments.demo_settings import settings_for, task_name
from opd.experiments.rates import swept_rates
from opd.experiments.self_distill import run_self_distill
from opd.experiments.settings import EXPERIMENT_PRESETS, ExperimentSettings


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _curve(rows: list[dict]) -> list[list[float]]:
    """[[step, cumulative training FLOPs, held-out accuracy], ...] at every evaluation."""
    out, flops = [], 0.0
    for r in rows:
        flops = r.get("flops/total", flops)
        if "eval/accuracy" in r:
            out.append([r["step"], flops, r["eval/accuracy"]])
    return out


def _first_reaching(curve, target: float):
    for step, flops, acc in curve:
        if acc >= target:
            return step, flops
    return None, None


def _median_or_none(values):
    """Median over seeds, a seed that missed the target counting as infinitely late; None ("not
    reached") when the median itself is a miss (most seeds missed)."""
    med = statistics.median(float("inf") if v is None else v for v in values)
    return None if med == float("inf") else med


def _ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def _methods(
    st: Stages, x: ExperimentSettings, sweep: bool = False
) -> dict[str, tuple[dict, int, float]]:
    """math's methods: name -> (flags for `opd distill`, step budget, learning rate); with
    sweep, lr-sweep's budgets."""
    teacher = {"model.teacher": str(st.teacher)}
    d = st.settings.opd_discount
    discount = {"objective.discount": d} if d else {}
    opd_steps, rl_steps, sft_steps = (
        x.sweep_steps if sweep else (x.opd_steps, x.rl_steps, x.sft_steps)
    )
    return {
        # the sampled-token estimator, with the task's credit (--task two-paths: discount 1)
        "opd": ({"objective.kind": "opd", **teacher, **discount}, opd_steps, x.opd_lr),
        "opd-full": (
            {"objective.kind": "opd", "objective.loss": "full", **teacher},
            opd_steps,
            x.opd_full_lr,
        ),
        "opd-jsd": (
            {
                "objective.kind": "opd",
                "objective.loss": "jsd",
                "objective.jsd_beta": x.jsd_beta,
                **teacher,
            },
            opd_steps,
            x.opd_jsd_lr,
        ),
        "rl": (
            {"objective.kind": "rl", "objective.extractor": st.common["eval.extractor"]},
            rl_steps,
            x.rl_lr,
        ),
        "sft": ({"objective.kind": "sft", **teacher}, sft_steps, x.sft_lr),
    }


def _run_to_target(
    st: Stages,
    x: ExperimentSettings,
    flags: dict,
    steps: int,
    lr: float,
    seed: int,
    target: float,
    run_dir: Path,
    quiet: bool,
    eval_prompts: Path | None = None,
) -> tuple[dict, list]:
    """One run from the SFT checkpoint that stops once held-out accuracy (on the test split,
    or on eval_prompts) reaches the target."""
    _stage(
        {
            **st.common,
            **flags,
            **({"eval.prompts": str(eval_prompts)} if eval_prompts else {}),
            "run.seed": seed,
            "model.student": str(st.sft),
            "data.prompts": str(st.prompts),
            "run.out": str(run_dir),
            "run.steps": steps,
            "run.save_every": steps,
            "data.batch_prompts": x.prompts,
            "sampling.group_size": x.group,
            "optim.lr": lr,
            "eval.every": x.eval_every,
            "eval.stop_at": target,
            "run.preflight": False,
        },
        quiet,
        force=True,
    )
    curve = _curve(_metrics(run_dir))
    step, flops = _first_reaching(curve, target)
    summary = {"seed": seed, "lr": lr, "steps_to_target": step, "flops_to_target": flops,
               "final_accuracy": curve[-1][2]}  # fmt: skip
    return summary, curve


def _ratios(methods: dict, opd: str) -> dict:
    rl, sft, o = methods["rl"], methods["sft"], methods[opd]
    return {
        "rl_over_opd_steps": _ratio(rl["steps_to_target"], o["steps_to_target"]),
        "rl_over_opd_flops": _ratio(rl["flops_to_target"], o["flops_to_target"]),
        "sft_over_opd_steps": _ratio(sft["steps_to_target"], o["steps_to_target"]),
        "sft_over_opd_flops": _ratio(sft["flops_to_target"], o["flops_to_target"]),
    }


def run_math(st: Stages, x: ExperimentSettings, out: Path, quiet: bool, log) -> dict:
    target = x.target_share * st.teacher_acc
    results = {}
    for name, (flags, steps, lr) in _methods(st, x).items():
        per_seed, curves = [], {}
        for seed in x.seeds:
            log(f"math: {name}, lr {lr}, seed {seed}, up to {steps} steps (stops at {target:.1%})")
            summary, curve = _run_to_target(
                st, x, flags, steps, lr, seed, target, out / f"{name}-seed{seed}", quiet
            )
            per_seed.append(summary)
            curves[str(seed)] = curve
        results[name] = {
            "lr": lr,
            "steps_to_target": _median_or_none([p["steps_to_target"] for p in per_seed]),
            "flops_to_target": _median_or_none([p["flops_to_target"] for p in per_seed]),
            "final_accuracy": statistics.median(p["final_accuracy"] for p in per_seed),
            "reached": sum(p["steps_to_target"] is not None for p in per_seed),
            "step_budget": steps,
            "per_seed": per_seed,
            "curves": curves,
        }
    return {
        "experiment": "math",
        "target_accuracy": target,
        "teacher_accuracy": st.teacher_acc,
        "sft_start_accuracy": st.sft_acc,
        "sft_steps": st.sft_steps,
        "seeds": list(x.seeds),
        "sequences_per_step": x.prompts * x.group,
        "methods": results,
        "ratios": _ratios(results, "opd"),  # against the blog's sampled-token estimator
        "ratios_opd_full": _ratios(results, "opd-full"),
        "ratios_opd_jsd": _ratios(results, "opd-jsd"),
    }


def _pick(runs: list[dict]) -> float:
    """The learning rate that reached the target in the fewest steps (ties: the higher final
    accuracy, then the first in the grid); if none did, the one with the highest final accuracy."""
    reached = [r for r in runs if r["steps_to_target"] is not None]
    if reached:
        return min(reached, key=lambda r: (r["steps_to_target"], -r["final_accuracy"]))["lr"]
    return max(runs, key=lambda r: r["final_accuracy"])["lr"]


def _past(lr: float, up: bool) -> float:
    """The next rate past lr on the 1-3-10 ladder: 1e-4 -> 3e-4 up, 3e-5 down; 3e-4 -> 1e-3
    up, 1e-4 down (another mantissa: x3 or /3), rounded to one significant digit."""
    mantissa = lr / 10 ** math.floor(math.log10(lr) + 1e-9)
    factor = {1: (3, 10 / 3), 3: (10 / 3, 3)}.get(round(mantissa), (3, 3))
    return float(f"{lr * factor[0] if up else lr / factor[1]:.1g}")


def _edge_step(runs: list[dict]) -> float | None:
    """The rate to try next when the pick is the lowest or highest rate run so far, else None."""
    lrs = sorted(r["lr"] for r in runs)
    best = _pick(runs)
    if len(lrs) < 2 or lrs[0] < best < lrs[-1]:
        return None
    return _past(best, up=best == lrs[-1])


def _sweep_run(st, x, name, flags, steps, target, out, quiet, log, lr: float) -> dict:
    log(f"lr-sweep: {name}, lr {lr}, up to {steps} steps (stops at {target:.1%}) ...")
    summary, curve = _run_to_target(
        st, x, flags, steps, lr, x.sweep_seed, target, out / f"{name}-lr{lr:g}", quiet, st.valid
    )
    return {**summary, "curve": curve}


def run_lr_sweep(st: Stages, x: ExperimentSettings, out: Path, quiet: bool, log) -> dict:
    """Each math method at every learning rate of x.sweep_lrs, one seed, x.sweep_steps budgets;
    then, while a method's pick is the lowest or highest rate it ran, the next rate past it (at
    most x.sweep_extend more)."""
    target = x.target_share * st.teacher_acc
    results = {}
    for name, (flags, steps, _) in _methods(st, x, sweep=True).items():
        sweep = (st, x, name, flags, steps, target, out, quiet, log)
        runs = [_sweep_run(*sweep, lr) for lr in x.sweep_lrs]
        for _ in range(x.sweep_extend):
            if (lr := _edge_step(runs)) is None:
                break
            log(f"lr-sweep: {name}'s pick {_pick(runs):g} is the edge of the rates run")
            runs.append(_sweep_run(*sweep, lr))
        runs.sort(key=lambda r: r["lr"])
        results[name] = {"step_budget": steps, "runs": runs, "best_lr": _pick(runs)}
    return {
        "experiment": "lr-sweep",
        "eval_split": "valid",
        "target_accuracy": target,
        "teacher_accuracy": st.teacher_acc,
        "sft_start_accuracy": st.sft_acc,
        "seed": x.sweep_seed,
        "lrs": list(x.sweep_lrs),
        "extend": x.sweep_extend,
        "sequences_per_step": x.prompts * x.group,
        "methods": results,
    }


def run_single_prompt(st: Stages, x: ExperimentSettings, out: Path, quiet: bool, log) -> dict:
    one = out / "one_prompt.jsonl"
    one.write_text(st.prompts.read_text().splitlines()[0] + "\n")
    log(f"single-prompt: {x.single_steps} steps x {x.single_rollouts} rollouts of one prompt ...")
    run_dir = out / "run"
    d = st.settings.opd_discount  # the task's credit, as math's "opd" (--task two-paths: 1)
    _stage(
        {
            **st.common,
            "model.student": str(st.sft),
            "model.teacher": str(st.teacher),
            **({"objective.discount": d} if d else {}),
            "data.prompts": str(one),
            "run.out": str(run_dir),
            "run.steps": x.single_steps,
            "run.save_every": x.single_steps,
            "data.batch_prompts": 1,
            "sampling.group_size": x.single_rollouts,
            "optim.lr": x.single_lr,
            "eval.every": max(1, x.single_steps // 4),
            "run.preflight": False,
        },
        quiet,
        force=True,
    )
    curve = _curve(_metrics(run_dir))
    return {
        "experiment": "single-prompt",
        "prompt": json.loads(one.read_text())["prompt"],
        "steps": x.single_steps,
        "rollouts_per_step": x.single_rollouts,
        "lr": x.single_lr,
        "discount": d,
        "teacher_accuracy": st.teacher_acc,
        "before": curve[0][2],
        "after": curve[-1][2],
        "curve": curve,
    }


RUNNERS = {
    "math": run_math,
    "lr-sweep": run_lr_sweep,
    "single-prompt": run_single_prompt,
    "self-distill": run_self_distill,
}


def run_experiment(
    name: str,
    out: str,
    preset: str = "default",
    cache_dir: str | None = None,
    quiet: bool = True,
    sft_stop_at: float | None = None,
    teacher_stop_at: float | None = None,
    rl_steps: int | None = None,
    lr_from: str | None = None,
    opd_steps: int | None = None,
    task: str = "addition",
    sft_steps: int | None = None,
) -> dict:
    """sft_stop_at: stop the shared SFT stage at this validation accuracy instead of the demo's
    (a lower start makes the RL reward sparser: most groups of samples are all wrong).
    lr_from: math's learning rates from that folder's lr-sweep (made on the same stages).
    teacher_stop_at: stop the teacher's training at this validation accuracy (an imperfect
    teacher whose temperature-1 samples, SFT's data, carry its mistakes).
    task: "addition" or "two-paths" (demo_settings.TWO_PATHS: both paths, a 1-layer student,
    and OPD's sampled-token estimator with sequence-level credit).
    rl_steps, opd_steps, sft_steps: math's RL budget, each OPD loss's and continued SFT's,
    instead of the preset's (runs stop early at the target)."""
    t0 = time.time()
    x = EXPERIMENT_PRESETS[preset]
    for field, steps in (
        ("rl_steps", rl_steps),
        ("opd_steps", opd_steps),
        ("sft_steps", sft_steps),
    ):
        if steps is None:
            continue
        if name != "math" or steps < 1:
            flag = field.replace("_", "-")
            raise OpdError(f"--{flag}={steps}: must be a positive step count, for math only")
        x = replace(x, **{field: steps})
    if lr_from and name != "math":
        raise OpdError(f"--lr-from {lr_from}: for math only (its learning rates)")
    stages = settings_for(x.stages, task)
    for field, value in (("sft_stop_at", sft_stop_at), ("teacher_stop_at", teacher_stop_at)):
        if value is None:
            continue
        if not 0 < value <= 1:  # 0 would mean "never stop early"
            raise OpdError(f"--{field.replace('_', '-')}={value}: must be in (0, 1]")
        stages = replace(stages, **{field: value})
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:
        print(f"[{time.time() - t0:6.1f} s] {msg}", flush=True)

    st = prepare(stages, 0, cache_dir, quiet, log)
    if lr_from:
        x = replace(x, **swept_rates(lr_from, stages, st.sft_acc))
    result = RUNNERS[name](st, x, root, quiet, log)
    result |= {
        "preset": preset,
        "sft_stop_at": stages.sft_stop_at,
        "teacher_stop_at": stages.teacher_stop_at or None,
        "teacher_steps": st.teacher_steps,
        "lr_from": lr_from,
        "settings": asdict(replace(x)),
        "task": task_name(st.settings),
        "wall_seconds": round(time.time() - t0, 1),
    }
    from opd.experiments.report import save_results

    return save_results(result, root)
