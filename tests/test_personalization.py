"""`opd experiment personalization|continual` in their seconds-long preset: the files, the
results' schema, and a real direction of change (mid-training learns the documents, OPD moves
the student toward the assistant)."""

import json
import statistics

import pytest

from opd.cli import main


def _experiment(name, out, cache):
    with pytest.raises(SystemExit) as e:
        main(["experiment", name, "--preset", "test", "--out", str(out), "--cache-dir", str(cache)])
    assert e.value.code == 0
    return json.loads((out / "results.json").read_text())


def _metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _fractions(d):
    for v in d.values():
        for x in v if isinstance(v, list) else [v]:
            assert 0.0 <= x <= 1.0


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def personal(tmp_path_factory, cache):
    out = tmp_path_factory.mktemp("p")
    return out, _experiment("personalization", out, cache)


def test_personalization(personal):
    out, r = personal
    for name in ("results.json", "report.md", "personalization.png"):
        assert (out / name).stat().st_size > 0
    assert r["experiment"] == "personalization" and r["seeds"] == [0, 1]
    assert set(r["midtrain"]) == {"documents", "mixed", "lora"}
    for scores in [*r["midtrain"].values(), r["opd"], r["opd_full"], r["sft_self"]]:
        assert {"if", "qa_new", "qa_base"} <= set(scores)
        _fractions({k: v for k, v in scores.items() if k != "flops"})
        assert scores["flops"] > 0
    _fractions({k: v for k, v in r["assistant"].items()})
    assert r["wall_seconds"] > 0
    # the reported figures are the medians of the seeds'
    per = [r["per_seed"][str(s)]["opd"]["if"] for s in r["seeds"]]
    assert r["opd"]["if"] == statistics.median(per)
    for seed in r["seeds"]:
        runs = out / f"seed{seed}"
        # mid-training learns its documents: the NLL of its batches falls
        loss = [m["loss"] for m in _metrics(runs / "midtrain-documents")]
        assert loss[-1] < loss[0] - 0.1
        # OPD moves the student toward the assistant: the teacher KL of its samples falls
        kl = [m["teacher/kl"] for m in _metrics(runs / "opd")]
        assert statistics.mean(kl[-2:]) < statistics.mean(kl[:2])
        # the control samples from the assistant and never scores with it
        assert "teacher/kl" not in _metrics(runs / "sft_self")[0]
    assert "| mid-trained: documents only |" in (out / "report.md").read_text()


def test_continual(personal, tmp_path, cache):
    out = tmp_path / "c"
    r = _experiment("continual", out, cache)
    assert r["assistant_cached"] and r["assistant"]["if"] == personal[1]["assistant"]["if"]
    assert (out / "continual.png").stat().st_size > 0
    tracks = [r["phases"], r["phases_original_teacher"], r["midtrain_only"]]
    for phases in tracks:
        assert len(phases) == 2
        for k, p in enumerate(phases):
            assert len(p["qa"]) == len(p["qa_midtrain"]) == k + 1  # every phase's people so far
            _fractions(p)
    # phase 1 is one run shared by the tracks; from phase 2 OPD's teachers differ
    assert r["phases"][0] == r["phases_original_teacher"][0]
    assert r["midtrain_only"][0]["if_midtrain"] == r["phases"][0]["if_midtrain"]
    assert "if_opd" not in r["midtrain_only"][0]
    assert (out / "phase2-original" / "opd").is_dir() and (out / "phase2-previous" / "opd").is_dir()
    assert not (out / "phase1-original").exists()  # shared with phase1-previous


def test_report_has_the_claims(personal, tmp_path):
    from opd.experiments.report import write_report

    text = write_report([str(personal[0])], str(tmp_path / "r.md")).read_text()
    assert "OPD from the earlier assistant restores IF" in text


def test_sweep(personal, tmp_path, cache):
    out = tmp_path / "s"
    r = _experiment("personalization-sweep", out, cache)
    # the same chat rows and base documents (one more new set in the world): the same assistant
    assert r["assistant_cached"] and r["assistant"]["if"] == personal[1]["assistant"]["if"]
    assert r["set"] == len(r["seeds"]) == 2  # a set no reported seed reads
    assert set(r["lora"]) == {"0.01"} and r["best"]["lora"] == "0.01"
    for name in ("opd", "opd_full", "sft_self"):
        assert set(r[name]) == {"0.001", "0.0001"}
        for m in r[name].values():
            _fractions({k: v for k, v in m.items() if k != "balance"})
            assert m["balance"] <= m["qa_new"] / max(r["midtrain"]["qa_new"], 1e-9) + 1e-9
        assert r["best"][name] == max(r[name], key=lambda lr: r[name][lr]["balance"])
        assert (out / f"{name}-0.0001" / "metrics.jsonl").is_file()
    assert "| OPD (sampled-token) | " in (out / "report.md").read_text()
