"""`opd experiment` in its seconds-long test mode: files and schema; `opd report` from saved results."""

from __future__ import annotations

import json

import pytest

from opd.cli import main
from opd.experiments.blog import run_experiment
from opd.experiments.report import write_report


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("experiments")
    cache = str(root / "cache")
    out = {}
    for name in ("math", "single-prompt", "self-distill"):
        out[name] = run_experiment(name, str(root / name), "test", cache)
    return root, out


def test_math_results_schema(runs):
    root, out = runs
    r = json.loads((root / "math" / "results.json").read_text())
    assert r == json.loads(json.dumps(out["math"]))
    assert {"target_accuracy", "teacher_accuracy", "methods", "ratios"} <= r.keys()
    assert set(r["methods"]) == {"opd", "rl", "sft"}
    for m in r["methods"].values():
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
    for png in ("math_steps.png", "math_flops.png"):
        assert (root / "math" / png).stat().st_size > 1000


def test_single_prompt_and_self_distill_results(runs):
    root, out = runs
    single = out["single-prompt"]
    assert single["rollouts_per_step"] == 4 and single["steps"] == 2
    assert {"before", "after", "teacher_accuracy", "curve"} <= single.keys()
    selfd = out["self-distill"]
    for m in selfd["methods"].values():
        assert [c[0] for c in m["curve"]] == [0, 1, 2]
        assert m["curve"][0][2] == pytest.approx(0.0, abs=1e-5)  # the start vs itself
    assert all(abs(m["final_kl"]) < 10 for m in selfd["methods"].values())
    assert (root / "self-distill" / "self_distill.png").is_file()


def test_report_renders_from_saved_results(runs, tmp_path, capsys):
    root, _ = runs
    dirs = [str(root / n) for n in ("math", "single-prompt", "self-distill")]
    dest = write_report(dirs, str(tmp_path / "report.md"))
    text = dest.read_text()
    assert text.startswith("# opd: the blog's claims beside our measurements")
    assert "| blog claim | blog figure | ours |" in text
    assert "7-10x fewer steps" in text and "single prompt" in text
    assert "math_steps.png" in text
    with pytest.raises(SystemExit) as e:
        main(["report", str(tmp_path / "nothing")])
    assert e.value.code == 2
    assert "no results.json" in capsys.readouterr().err
