"""`opd experiment` in its seconds-long test mode: files and schema; `opd report` from saved results."""

from __future__ import annotations

import itertools
import json

import pytest

from opd.cli import main
from opd.experiments.blog import _edge_step, _past, _pick, run_experiment
from opd.experiments.report import experiment_section, write_report


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("experiments")
    cache = str(root / "cache")
    out = {}
    for name in ("math", "lr-sweep", "single-prompt", "self-distill"):
        # --rl-steps and --opd-steps: math's RL and OPD budgets
        budget = {"rl_steps": 4, "opd_steps": 2} if name == "math" else {}
        out[name] = run_experiment(name, str(root / name), "test", cache, **budget)
    return root, out


def test_math_results_schema(runs):
    root, out = runs
    r = json.loads((root / "math" / "results.json").read_text())
    assert r == json.loads(json.dumps(out["math"]))
    assert {"target_accuracy", "teacher_accuracy", "methods", "ratios"} <= r.keys()
    methods = {"opd", "opd-full", "opd-jsd", "rl", "sft"}
    assert set(r["methods"]) == methods and r["sft_stop_at"] == 0.0
    assert set(r["ratios"]) == set(r["ratios_opd_full"]) == set(r["ratios_opd_jsd"])
    lrs = {"opd": 3e-3, "opd-full": 2e-3, "opd-jsd": 2e-3, "rl": 1e-3, "sft": 4e-3}  # test preset
    for name, m in r["methods"].items():
        assert m["lr"] == lrs[name] and all(p["lr"] == lrs[name] for p in m["per_seed"])
        cfg = json.loads((root / "math" / f"{name}-seed1" / "config.json").read_text())
        assert cfg["optim"]["lr"] == lrs[name] and cfg["eval"]["prompts"].endswith("test.jsonl")
        assert m["step_budget"] == {"rl": 4, "sft": 3}.get(name, 2)
        assert {"steps_to_target", "flops_to_target", "final_accuracy", "curves"} <= m.keys()
        assert set(m["curves"]) == {"0", "1"}  # one curve per seed
        for curve in m["curves"].values():
            steps = [c[0] for c in curve]
            flops = [c[1] for c in curve]
            assert steps == sorted(steps) and flops == sorted(flops) and flops[-1] > 0
            assert all(0 <= c[2] <= 1 for c in curve)
    # each method's runs are ordinary opd runs, with the ledger in their metrics
    rl = (root / "math" / "rl-seed0" / "metrics.jsonl").read_text().splitlines()
    assert "reward/mean" in json.loads(rl[1]) and "flops/teacher_scoring" not in json.loads(rl[1])
    sft = json.loads((root / "math" / "sft-seed0" / "metrics.jsonl").read_text().splitlines()[1])
    assert sft["flops/teacher_sampling"] > 0
    full = json.loads((root / "math" / "opd-full-seed0" / "config.json").read_text())
    assert full["objective"]["loss"] == "full"
    jsd = json.loads((root / "math" / "opd-jsd-seed0" / "config.json").read_text())
    assert jsd["objective"]["loss"] == "jsd" and jsd["objective"]["jsd_beta"] == 0.5
    assert "| OPD with generalized JSD (beta 0.5) |" in (root / "math" / "report.md").read_text()
    for png in ("math_steps.png", "math_flops.png"):
        assert (root / "math" / png).stat().st_size > 1000


def test_lr_sweep_runs_every_method_at_every_lr(runs):
    root, out = runs
    r = json.loads((root / "lr-sweep" / "results.json").read_text())
    assert r["lrs"] == [1e-3, 3e-3] and r["extend"] == 1  # the test preset's grid
    assert set(r["methods"]) == {"opd", "opd-full", "opd-jsd", "rl", "sft"}
    for name, m in r["methods"].items():
        ran = [run["lr"] for run in m["runs"]]
        assert ran == sorted(ran) and set(r["lrs"]) <= set(ran) and m["best_lr"] in ran
        # one rate past the grid (3e-4 below, 1e-2 above) where the grid's pick was its edge
        grid_runs = [run for run in m["runs"] if run["lr"] in r["lrs"]]
        assert set(ran) - set(r["lrs"]) == {_past(_pick(grid_runs), _pick(grid_runs) == 3e-3)}
        assert m["step_budget"] == 2  # the sweep's own budgets; math's test budgets are 3
        for run in m["runs"]:
            cfg = json.loads(
                (root / "lr-sweep" / f"{name}-lr{run['lr']:g}" / "config.json").read_text()
            )
            assert cfg["optim"]["lr"] == run["lr"]
            assert cfg["eval"]["prompts"].endswith("valid.jsonl")  # never the test split
    report = (root / "lr-sweep" / "report.md").read_text()
    ran = sorted({run["lr"] for m in r["methods"].values() for run in m["runs"]})
    assert "| method | " + " | ".join(f"lr {lr:g}" for lr in ran) + " | step budget |" in report
    assert ("'-' marks a rate a method did not run" in report) == (len(ran) > 2)


def test_a_pick_at_the_edge_of_the_rates_run_asks_for_the_next_rate_past_it():
    assert [_past(lr, up=True) for lr in (1e-4, 3e-4, 1e-3)] == [3e-4, 1e-3, 3e-3]
    assert [_past(lr, up=False) for lr in (1e-4, 3e-5, 3e-4)] == [3e-5, 1e-5, 1e-4]

    def run(lr, acc, steps=None):
        return {"lr": lr, "steps_to_target": steps, "final_accuracy": acc}

    # RL from a 4% start: every grid rate lost ground, 1e-4 least; 3e-5 learnt
    runs = [run(1e-4, 0.015), run(3e-4, 0.0), run(1e-3, 0.0)]
    assert _edge_step(runs) == 3e-5
    assert _edge_step(runs + [run(3e-5, 0.135)]) == 1e-5
    assert _edge_step(runs + [run(3e-5, 0.135), run(1e-5, 0.05)]) is None  # 3e-5 is inside
    assert _edge_step([run(1e-4, 0.5), run(3e-4, 0.9, steps=40)]) == 1e-3  # the top edge
    assert _edge_step([run(1e-4, 0.5), run(3e-4, 0.9), run(1e-3, 0.2)]) is None
    assert _edge_step([run(1e-4, 0.5)]) is None  # one rate has no edge to step past


def test_pick_prefers_fewest_steps_then_accuracy():
    runs = [
        {"lr": 1e-4, "steps_to_target": None, "final_accuracy": 0.99},
        {"lr": 3e-4, "steps_to_target": 50, "final_accuracy": 0.95},
        {"lr": 1e-3, "steps_to_target": 50, "final_accuracy": 0.97},
        {"lr": 3e-3, "steps_to_target": 70, "final_accuracy": 1.0},
    ]
    assert _pick(runs) == 1e-3
    assert _pick([{**r, "steps_to_target": None} for r in runs]) == 3e-3


def test_single_prompt_and_self_distill_results(runs):
    root, out = runs
    single = out["single-prompt"]
    assert single["rollouts_per_step"] == 4 and single["steps"] == 2 and single["discount"] == 0
    assert {"before", "after", "teacher_accuracy", "curve"} <= single.keys()
    selfd = out["self-distill"]
    for m in selfd["methods"].values():
        assert [c[0] for c in m["curve"]] == [0, 1, 2]
        assert m["curve"][0][2] == pytest.approx(0.0, abs=1e-5)  # the start vs itself
    assert all(abs(m["final_kl"]) < 10 for m in selfd["methods"].values())
    # with the deadzone every k_t of a model against itself is rounding: nothing moves
    assert set(selfd["methods"]) == {"sft", "opd", "opd-deadzone"}
    dz = selfd["methods"]["opd-deadzone"]
    assert [c[1] for c in dz["curve"]] == [selfd["start_accuracy"]] * 3
    assert all(abs(c[2]) < 1e-6 for c in dz["curve"])
    assert (root / "self-distill" / "self_distill.png").is_file()


def test_report_renders_from_saved_results(runs, tmp_path, capsys):
    root, _ = runs
    dirs = [str(root / n) for n in ("math", "lr-sweep", "single-prompt", "self-distill")]
    dest = write_report(dirs, str(tmp_path / "report.md"))
    text = dest.read_text()
    assert text.startswith("# opd: the blog's claims beside our measurements")
    assert "| blog claim | blog figure | ours |" in text
    assert "7-10x fewer steps" in text and "single prompt" in text
    assert "math_steps.png" in text and "## lr-sweep" in text
    assert "full-vocabulary OPD" in text
    with pytest.raises(SystemExit) as e:
        main(["report", str(tmp_path / "nothing")])
    assert e.value.code == 2
    assert "no results.json" in capsys.readouterr().err
    # 0 would mean "never stop early": the most-trained checkpoint
    for flag, bad in itertools.product(("--sft-stop-at", "--teacher-stop-at"), ("1.5", "0")):
        with pytest.raises(SystemExit) as e:
            main(
                ["experiment", "math", "--out", str(tmp_path / "x"), flag, bad]
                + ["--preset", "test", "--cache-dir", str(tmp_path / "cache")]
            )
        assert e.value.code == 2
        assert f"{flag}={float(bad)}: must be in (0, 1]" in capsys.readouterr().err
    for flag, (name, steps) in itertools.product(
        ("--rl-steps", "--opd-steps"), (("math", "0"), ("self-distill", "5"))
    ):
        with pytest.raises(SystemExit) as e:
            main(["experiment", name, "--out", str(tmp_path / "x"), flag, steps])
        assert e.value.code == 2
        assert f"{flag}={steps}: must be a positive step count" in capsys.readouterr().err


def test_math_takes_its_learning_rates_from_a_sweep_on_the_same_stages(runs, tmp_path, capsys):
    root, out = runs
    cache = str(root / "cache")
    best = {name: m["best_lr"] for name, m in out["lr-sweep"]["methods"].items()}
    r = run_experiment("math", str(tmp_path / "m"), "test", cache, rl_steps=4,
                       lr_from=str(root / "lr-sweep"))  # fmt: skip
    assert r["lr_from"] == str(root / "lr-sweep")
    report = (tmp_path / "m" / "report.md").read_text()
    assert f"picked by the `opd experiment lr-sweep` saved in {root / 'lr-sweep'}" in report
    assert {name: m["lr"] for name, m in r["methods"].items()} == best
    other = tmp_path / "other"  # a sweep of another SFT start is refused
    other.mkdir()
    saved = json.loads((root / "lr-sweep" / "results.json").read_text())
    (other / "results.json").write_text(json.dumps({**saved, "sft_stop_at": 0.1}))
    older = tmp_path / "older"  # a sweep from before math ran generalized JSD is refused
    older.mkdir()
    methods = {k: v for k, v in saved["methods"].items() if k != "opd-jsd"}
    (older / "results.json").write_text(json.dumps({**saved, "methods": methods}))
    for sweep, message in ((other, "swept with sft_stop_at=0.1, this run has"),
                           (older, "no sweep of opd-jsd in"),
                           (root / "math", "is not an lr-sweep's results"),
                           (tmp_path / "none", "cannot read")):  # fmt: skip
        with pytest.raises(SystemExit) as e:
            main(["experiment", "math", "--out", str(tmp_path / "x"), "--lr-from", str(sweep),
                  "--preset", "test", "--cache-dir", cache])  # fmt: skip
        assert e.value.code == 2
        assert message in capsys.readouterr().err


def test_report_gives_a_lower_bound_when_the_baseline_misses_the_target(tmp_path):
    def method(steps, flops, budget, last_flops):
        curve = [[0, 0.0, 0.2], [budget, last_flops, 0.5 if steps is None else 0.96]]
        return {
            "lr": 1e-4,
            "steps_to_target": steps,
            "flops_to_target": flops,
            "final_accuracy": curve[-1][2],
            "reached": 0 if steps is None else 1,
            "step_budget": budget,
            "per_seed": [{}],
            "curves": {"0": curve},
        }

    none = dict.fromkeys(
        ("rl_over_opd_steps", "rl_over_opd_flops", "sft_over_opd_steps", "sft_over_opd_flops")
    )
    r = {
        "experiment": "math",
        "target_accuracy": 0.95,
        "teacher_accuracy": 1.0,
        "sft_start_accuracy": 0.2,
        "sft_stop_at": 0.1,
        "seeds": [0],
        "sequences_per_step": 8,
        "methods": {
            "opd": method(None, None, 150, 6e12),  # missed too: no bound against it
            "opd-full": method(80, 4e12, 150, 7e12),
            "rl": method(None, None, 300, 1e13),
            "sft": method(110, 5e12, 300, 5e12),
        },
        "ratios": {**none, "sft_over_opd_steps": None},
        "ratios_opd_full": {**none, "sft_over_opd_steps": 110 / 80, "sft_over_opd_flops": 1.3},
    }
    text, claims = experiment_section(r, tmp_path)
    assert "an SFT stage that stops early at 10.0% validation accuracy" in text
    # RL ran its whole 300-step budget (1e13 FLOPs) without reaching what OPD reached in 80 (4e12)
    assert "| full-vocabulary OPD | > 3.8x | > 2.5x | 1.4x | 1.3x |" in text
    assert "| sampled-token OPD | n/a | n/a | n/a | n/a |" in text
    assert "> 3.8x (full-vocabulary OPD)" in claims[0][2]


def test_report_renders_results_from_before_opd_full(tmp_path):
    """A results.json written before per-method learning rates and opd-full still renders."""
    curve = {"0": [[0, 0.0, 0.4], [50, 1e12, 0.96]]}
    old = {"steps_to_target": 50, "flops_to_target": 1e12, "final_accuracy": 0.96}
    old |= {"reached": 1, "step_budget": 60, "per_seed": [{}], "curves": curve}
    ratios = {"rl_over_opd_steps": 1.0, "rl_over_opd_flops": 1.0}
    ratios |= {"sft_over_opd_steps": 1.0, "sft_over_opd_flops": 1.0}
    r = {
        "experiment": "math",
        "target_accuracy": 0.95,
        "teacher_accuracy": 1.0,
        "sft_start_accuracy": 0.4,
        "seeds": [0],
        "sequences_per_step": 8,
        "lr": 3e-4,
        "settings": {"stages": "default"},
        "methods": {"opd": old, "rl": old, "sft": old},
        "ratios": ratios,
    }
    text, _ = experiment_section(r, tmp_path)
    assert "| 0.0003 | 50 |" in text and "| full-vocabulary OPD | n/a | n/a | n/a | n/a |" in text


def test_an_imperfect_teacher_stops_at_its_validation_accuracy(tmp_path):
    from dataclasses import replace

    from opd.experiments.demo import prepare
    from opd.experiments.demo_settings import PRESETS

    stages = replace(PRESETS["test"], teacher_stop_at=0.99)
    st = prepare(stages, 0, str(tmp_path / "cache"), True, lambda msg: None)
    cfg = json.loads((st.teacher.parent / "run" / "config.json").read_text())
    assert cfg["eval"]["stop_at"] == 0.99 and cfg["eval"]["prompts"].endswith("valid.jsonl")
    assert cfg["eval"]["every"] == 25
    rows = (st.teacher.parent / "run" / "metrics.jsonl").read_text().splitlines()
    evals = [json.loads(x) for x in rows if "eval/accuracy" in json.loads(x)]
    assert [e["step"] for e in evals][:2] == [0, 25]
    assert st.teacher_steps == json.loads(rows[-1])["step"] <= stages.teacher_steps
    # a fully trained teacher's stage is cached under another key (old caches stay valid)
    full = prepare(PRESETS["test"], 0, str(tmp_path / "cache"), True, lambda msg: None)
    assert full.teacher != st.teacher
    full_cfg = json.loads((full.teacher.parent / "run" / "config.json").read_text())
    assert full_cfg["eval"]["prompts"] == "" and full.teacher_steps == stages.teacher_steps
    text, claims = experiment_section(
        {**_imperfect_results(), "teacher_stop_at": 0.9, "teacher_steps": 350}, tmp_path
    )
    assert "an imperfect teacher: its training stopped at 90.0% validation accuracy" in text
    assert "after 350 steps" in text and "imperfect teacher 92.0%" in claims[1][2]
    assert "old task" not in claims[1][2]
    # results measured on the old task (an answer line after the trace) say so in the claims
    old = {**_imperfect_results(), "teacher_stop_at": 0.9, "teacher_steps": 350}
    old["task"] = "4-digit addition, digit by digit, with an answer line"
    assert experiment_section(old, tmp_path)[1][1][2] == claims[1][2] + "; old task (answer line)"


def _imperfect_results() -> dict:
    curve = {"0": [[0, 0.0, 0.4], [50, 1e12, 0.9]]}
    m = {"lr": 1e-4, "steps_to_target": 50, "flops_to_target": 1e12, "final_accuracy": 0.9}
    m |= {"reached": 1, "step_budget": 60, "per_seed": [{}], "curves": curve}
    ratios = dict.fromkeys(
        ("rl_over_opd_steps", "rl_over_opd_flops", "sft_over_opd_steps", "sft_over_opd_flops"), 1.0
    )
    return {
        "experiment": "math",
        "target_accuracy": 0.874,
        "teacher_accuracy": 0.92,
        "sft_start_accuracy": 0.4,
        "sft_stop_at": 0.3,
        "seeds": [0],
        "sequences_per_step": 8,
        "methods": {name: m for name in ("opd", "opd-full", "rl", "sft")},
        "ratios": ratios,
        "ratios_opd_full": ratios,
    }


def test_math_on_the_two_path_task(runs, tmp_path, capsys):
    """--task two-paths: its own teacher and SFT stages, one verifier reading either path, and the
    sampled-token OPD with sequence-level credit (the other losses have no discount)."""
    root, _ = runs
    cache = str(root / "cache")
    with pytest.raises(SystemExit) as e:  # a sweep made on the one-path task is refused
        main(["experiment", "math", "--out", str(tmp_path / "x"), "--lr-from",
              str(root / "lr-sweep"), "--task", "two-paths", "--preset", "test", "--cache-dir",
              cache])  # fmt: skip
    assert e.value.code == 2
    assert (
        "swept with task='2-digit addition, digit by digit', this run has"
        in capsys.readouterr().err
    )
    r = run_experiment("math", str(tmp_path / "m"), "test", cache, rl_steps=2, opd_steps=2,
                       task="two-paths", sft_steps=2)  # fmt: skip
    budgets = {name: m["step_budget"] for name, m in r["methods"].items()}
    assert budgets == {"opd": 2, "opd-full": 2, "opd-jsd": 2, "rl": 2, "sft": 2}
    assert r["task"] == "2-digit addition, two paths (trace+sums), a 1-layer student"
    configs = {
        name: json.loads((tmp_path / "m" / f"{name}-seed0" / "config.json").read_text())
        for name in r["methods"]
    }
    assert configs["opd"]["objective"]["discount"] == 1.0
    assert configs["opd"]["objective"]["loss"] == "sampled"
    assert all(configs[n]["objective"]["discount"] == 0.0 for n in ("opd-full", "opd-jsd", "rl"))
    extractors = {c["eval"]["extractor"] for c in configs.values()}
    assert extractors == {"opd.tasks.addition:extract_either_answer"}
    assert configs["rl"]["objective"]["extractor"] == "opd.tasks.addition:extract_either_answer"
    report = (tmp_path / "m" / "report.md").read_text()  # the report names task and credit
    assert "(2 seeds; two-path task)" in report
    assert "(an SFT stage of a fixed 5 steps)" in report
    assert "| on-policy distillation (sampled-token) with sequence-level credit | 0.003 |" in report
    single = run_experiment("single-prompt", str(tmp_path / "s"), "test", cache, task="two-paths")
    run_cfg = json.loads((tmp_path / "s" / "run" / "config.json").read_text())
    assert run_cfg["objective"]["discount"] == 1.0 == single["discount"]  # the task's credit
    single_report = (tmp_path / "s" / "report.md").read_text()
    assert "objective.discount=1" in single_report and "two paths (trace+sums)" in single_report
    claims = write_report([str(tmp_path / "s")], str(tmp_path / "claims.md")).read_text()
    assert "2 x 4; two-path task |" in claims  # the claims row names the task
    one_path = json.loads((root / "math" / "opd-seed0" / "config.json").read_text())
    assert configs["opd"]["model"]["teacher"] != one_path["model"]["teacher"]
    assert one_path["objective"]["discount"] == 0.0
    with pytest.raises(SystemExit) as e:
        main(["experiment", "personalization", "--out", str(tmp_path / "p"), "--task",
              "two-paths", "--preset", "test"])  # fmt: skip
    assert e.value.code == 2
    assert "--task two-paths is for the demo and the math experiments" in capsys.readouterr().err
