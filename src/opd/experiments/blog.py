"""`opd experiment`: the blog's comparisons, on the demo's task, teacher and SFT checkpoint.

- math: from one SFT checkpoint, on-policy distillation vs RL (0/1 answer reward) vs continued
  SFT on the teacher's samples, the same number of sampled sequences per step, several seeds;
  steps and FLOPs to reach 95% of the teacher's accuracy.
- single-prompt: on-policy distillation on one training prompt, many rollouts a step.
- self-distill: the teacher is the starting student itself; SFT on its own samples vs OPD
  against itself, held-out accuracy and KL to the starting model over steps.

Every run is an ordinary `opd distill` / `opd sft` / `opd rl` run under DIR/<experiment>/, so
its metrics.jsonl (with the FLOPs ledger) is there to inspect. Learning rates are one value per
method, not swept (see the settings below and the report).
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from opd.experiments.demo import EXTRACTOR, PRESETS, Stages, _stage, prepare


@dataclass(frozen=True)
class ExperimentSettings:
    stages: str = "default"  # the demo preset whose teacher and SFT checkpoint are used
    seeds: tuple[int, ...] = (0, 1, 2)
    prompts: int = 32  # per step; x group = sampled sequences per step, for every method
    group: int = 4
    lr: float = 3e-4
    opd_steps: int = 60
    rl_steps: int = 300
    sft_steps: int = 300
    eval_every: int = 10
    target_share: float = 0.95  # of the teacher's accuracy
    single_steps: int = 20
    single_rollouts: int = 256
    single_lr: float = 3e-5  # 3e-4 over-fits the one prompt: 60.5% -> 15.5% held-out
    self_steps: int = 100
    self_lr: float = 1e-3
    self_every: int = 20


EXPERIMENT_PRESETS = {
    "default": ExperimentSettings(),
    "quick": ExperimentSettings(
        seeds=(0,), opd_steps=30, rl_steps=100, sft_steps=100, single_rollouts=64, self_steps=40
    ),
    "test": ExperimentSettings(
        stages="test",
        seeds=(0, 1),
        prompts=4,
        group=2,
        lr=3e-3,
        opd_steps=3,
        rl_steps=3,
        sft_steps=3,
        eval_every=1,
        single_steps=2,
        single_rollouts=4,
        self_steps=2,
        self_every=1,
    ),
}


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
    """Median over seeds when most seeds got there; None ("not reached") otherwise."""
    got = [v for v in values if v is not None]
    return statistics.median(got) if len(got) * 2 > len(values) else None


def _ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def run_math(st: Stages, x: ExperimentSettings, out: Path, quiet: bool, log) -> dict:
    target = x.target_share * st.teacher_acc
    methods = {
        "opd": ({"objective.kind": "opd", "model.teacher": str(st.teacher)}, x.opd_steps),
        "rl": ({"objective.kind": "rl", "objective.extractor": EXTRACTOR}, x.rl_steps),
        "sft": ({"objective.kind": "sft", "model.teacher": str(st.teacher)}, x.sft_steps),
    }
    results = {}
    for name, (flags, steps) in methods.items():
        per_seed, curves = [], {}
        for seed in x.seeds:
            log(f"math: {name}, seed {seed}, up to {steps} steps (stops at {target:.1%}) ...")
            run_dir = out / f"{name}-seed{seed}"
            _stage(
                {
                    **st.common,
                    **flags,
                    "run.seed": seed,
                    "model.student": str(st.sft),
                    "data.prompts": str(st.prompts),
                    "run.out": str(run_dir),
                    "run.steps": steps,
                    "run.save_every": steps,
                    "data.batch_prompts": x.prompts,
                    "sampling.group_size": x.group,
                    "optim.lr": x.lr,
                    "eval.every": x.eval_every,
                    "eval.stop_at": target,
                    "run.preflight": False,
                },
                quiet,
                force=True,
            )
            curve = _curve(_metrics(run_dir))
            step, flops = _first_reaching(curve, target)
            curves[str(seed)] = curve
            per_seed.append(
                {
                    "seed": seed,
                    "steps_to_target": step,
                    "flops_to_target": flops,
                    "final_accuracy": curve[-1][2],
                }
            )
        results[name] = {
            "steps_to_target": _median_or_none([p["steps_to_target"] for p in per_seed]),
            "flops_to_target": _median_or_none([p["flops_to_target"] for p in per_seed]),
            "final_accuracy": statistics.median(p["final_accuracy"] for p in per_seed),
            "reached": sum(p["steps_to_target"] is not None for p in per_seed),
            "step_budget": steps,
            "per_seed": per_seed,
            "curves": curves,
        }
    opd, rl, sft = results["opd"], results["rl"], results["sft"]
    return {
        "experiment": "math",
        "target_accuracy": target,
        "teacher_accuracy": st.teacher_acc,
        "sft_start_accuracy": st.sft_acc,
        "seeds": list(x.seeds),
        "sequences_per_step": x.prompts * x.group,
        "lr": x.lr,
        "methods": results,
        "ratios": {
            "rl_over_opd_steps": _ratio(rl["steps_to_target"], opd["steps_to_target"]),
            "rl_over_opd_flops": _ratio(rl["flops_to_target"], opd["flops_to_target"]),
            "sft_over_opd_steps": _ratio(sft["steps_to_target"], opd["steps_to_target"]),
            "sft_over_opd_flops": _ratio(sft["flops_to_target"], opd["flops_to_target"]),
        },
    }


def run_single_prompt(st: Stages, x: ExperimentSettings, out: Path, quiet: bool, log) -> dict:
    one = out / "one_prompt.jsonl"
    one.write_text(st.prompts.read_text().splitlines()[0] + "\n")
    log(f"single-prompt: {x.single_steps} steps x {x.single_rollouts} rollouts of one prompt ...")
    run_dir = out / "run"
    _stage(
        {
            **st.common,
            "model.student": str(st.sft),
            "model.teacher": str(st.teacher),
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
        "teacher_accuracy": st.teacher_acc,
        "before": curve[0][2],
        "after": curve[-1][2],
        "curve": curve,
    }


def run_self_distill(st: Stages, x: ExperimentSettings, out: Path, quiet: bool, log) -> dict:
    """Both runs use the starting student as the teacher; KL to it is measured the same way."""
    results = {}
    for name, kind in (("sft", "sft"), ("opd", "opd")):
        log(f"self-distill: {name} against the starting model, {x.self_steps} steps ...")
        run_dir, curve = out / name, []
        for steps in range(0, x.self_steps + 1, x.self_every):
            model = st.sft
            if steps:
                model = _stage(
                    {
                        **st.common,
                        "objective.kind": kind,
                        "model.student": str(st.sft),
                        "model.teacher": str(st.sft),
                        "data.prompts": str(st.prompts),
                        "run.out": str(run_dir),
                        "run.steps": steps,  # grows chunk by chunk; each call resumes
                        "run.save_every": x.self_every,
                        "data.batch_prompts": x.prompts,
                        "sampling.group_size": x.group,
                        "optim.lr": x.self_lr,
                        "eval.prompts": "",
                        "run.preflight": False,
                    },
                    quiet,
                    force=steps == x.self_every,
                )
            acc, kl = _accuracy_and_kl(model, st)
            curve.append([steps, acc, kl])
        results[name] = {"curve": curve, "final_accuracy": curve[-1][1], "final_kl": curve[-1][2]}
    return {
        "experiment": "self-distill",
        "start_accuracy": results["sft"]["curve"][0][1],
        "lr": x.self_lr,
        "steps": x.self_steps,
        "methods": results,
    }


def _accuracy_and_kl(model_dir: Path, st: Stages) -> tuple[float, float]:
    """Greedy held-out accuracy, and the reverse KL per token to the starting model on the
    model's own temperature-1 samples of the held-out prompts."""
    from opd.data import load_prompts
    from opd.evaluate import evaluate
    from opd.models import load_model, load_tokenizer
    from opd.preflight import own_sample_gaps

    acc = evaluate(str(model_dir), str(st.test), max_new_tokens=st.max_new, extractor=EXTRACTOR)
    tok = load_tokenizer(str(model_dir))
    model, start = load_model(str(model_dir)).eval(), load_model(str(st.sft)).eval()
    prompts, _ = load_prompts(str(st.test), tok)
    gaps = own_sample_gaps(model, tok, len(tok), prompts, st.max_new, start, 1)
    kl = float(gaps.mean())
    return acc["accuracy"], kl


RUNNERS = {"math": run_math, "single-prompt": run_single_prompt, "self-distill": run_self_distill}


def run_experiment(
    name: str, out: str, preset: str = "default", cache_dir: str | None = None, quiet: bool = True
) -> dict:
    t0 = time.time()
    x = EXPERIMENT_PRESETS[preset]
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:
        print(f"[{time.time() - t0:6.1f} s] {msg}", flush=True)

    st = prepare(PRESETS[x.stages], 0, cache_dir, quiet, log)
    result = RUNNERS[name](st, x, root, quiet, log)
    result |= {
        "preset": preset,
        "settings": asdict(replace(x)),
        "task": f"{st.settings.digits}-digit addition, digit by digit",
        "wall_seconds": round(time.time() - t0, 1),
    }
    (root / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    from opd.experiments.report import experiment_section

    text, _ = experiment_section(result, root)
    (root / "report.md").write_text(text)
    print(text)
    return result
