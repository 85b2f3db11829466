"""The demo's pieces: the addition task, the character tokenizer on disk, SFT, and the whole chain."""

import json
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from opd import tiny
from opd.cli import build_parser
from opd.errors import OpdError
from opd.experiments.demo import prepare, run_demo
from opd.experiments.demo_settings import PRESETS
from opd.tasks.addition import (
    CHARS,
    Addition,
    extract_answer,
    extract_either_answer,
    extract_trace_answer,
)


@given(digits=st.integers(1, 6), data=st.data())
def test_solution_trace_is_correct_and_extractable(digits, data):
    task = Addition(digits)
    a = data.draw(st.integers(0, 10**digits - 1))
    b = data.draw(st.integers(0, 10**digits - 1))
    sol = task.solution(a, b)
    assert extract_answer(sol) == task.answer(a, b) and int(task.answer(a, b)) == a + b
    steps = sol.split(";")[0].split(",")
    assert len(steps) == digits
    carry = 0
    for i, step in enumerate(steps):  # every column: a_i + b_i + carry = two-digit sum
        lhs, rhs = step.split("=")
        da, db, c = map(int, lhs.split("+"))
        assert (da, db, c) == ((a // 10**i) % 10, (b // 10**i) % 10, carry)
        assert int(rhs) == da + db + c
        carry = int(rhs) // 10
    assert set(task.prompt(a, b) + sol) <= set(CHARS)


@settings(max_examples=20)
@given(seed=st.integers(0, 1000))
def test_splits_are_disjoint_and_deterministic(seed):
    task = Addition(3)
    train = task.pairs(300, "train", seed, rng_seed=seed)
    valid = task.pairs(40, "valid", seed, rng_seed=seed)
    test = task.pairs(50, "test", seed, rng_seed=seed)
    assert not set(train) & set(test) and not set(train) & set(valid) and not set(valid) & set(test)
    assert len(set(train)) == 300 and len(set(test)) == 50
    assert task.pairs(50, "test", seed, rng_seed=seed) == test
    assert all(task.split_of(a, b, seed) == "test" for a, b in test)


@given(digits=st.integers(1, 6), data=st.data())
def test_trace_without_answer_line_gives_the_sum(digits, data):
    task = Addition(digits, answer_line=False)
    a = data.draw(st.integers(0, 10**digits - 1))
    b = data.draw(st.integers(0, 10**digits - 1))
    sol = task.solution(a, b)
    assert ";" not in sol and sol == Addition(digits).solution(a, b).split(";")[0]
    assert extract_trace_answer(sol) == task.answer(a, b)
    assert int(extract_trace_answer(sol)) == a + b


def test_extract_trace_answer_reads_only_well_formed_traces():
    assert extract_trace_answer("1+2+0=03,7+6+0=13,4+8+1=13,3+5+1=09") == "09333"
    assert extract_trace_answer("1+2+0=03,3+5+1=09 ") == "093"
    # a wrong column sum gives a wrong answer: the trace is read, not recomputed
    assert extract_trace_answer("1+2+0=04,3+5+1=09") == "094"
    for bad in ("", "1+2+0=03,", "1+2+0=03,7+6", "1+2+0=3", "1+2+0=03;03", "x1+2+0=03", "03"):
        assert extract_trace_answer(bad) == "", bad


@given(digits=st.integers(1, 6), data=st.data())
def test_both_paths_give_the_sum(digits, data):
    task = Addition(digits, answer_line=False)
    a = data.draw(st.integers(0, 10**digits - 1))
    b = data.draw(st.integers(0, 10**digits - 1))
    direct = task.direct(a, b)  # "=" and the sum, least significant digit first
    assert direct[0] == "=" and int(direct[1:][::-1]) == a + b and set(direct) <= set(CHARS)
    assert extract_either_answer(direct) == extract_either_answer(task.solution(a, b))
    assert extract_either_answer(direct) == task.answer(a, b)
    sums = task.sums(a, b)  # the column sums, each after a ",", least significant first
    assert sums[0] == "," and len(sums) == 3 * digits and set(sums) <= set(CHARS)
    assert extract_either_answer(sums) == task.answer(a, b)


def test_extract_either_answer_reads_only_one_well_formed_path():
    assert extract_either_answer("=33390") == "09333"
    assert extract_either_answer("1+2+0=03,3+5+1=09") == "093"
    assert extract_either_answer(",03,13,13,09") == "09333"
    assert Addition(4, answer_line=False).sums(3471, 5862) == ",03,13,13,09"
    for bad in ("=", "=12,3", "=1+2", ",03,13,", ",03,1x", ",", "=03,13", "1+2+0=03=12", "x=12"):
        assert extract_either_answer(bad) == "", bad


def test_extract_answer_edge_cases():
    assert extract_answer("1+2+0=03;03") == "03"
    assert extract_answer("no answer") == ""
    assert extract_answer("x;1;0042 ") == "0042"


def test_char_tokenizer_round_trip_through_save_pretrained(tmp_path):
    tok = tiny.char_tokenizer(chars=CHARS)
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    text = Addition(4).prompt(1234, 987) + Addition(4).solution(1234, 987)
    ids = loaded(text)["input_ids"]
    assert ids[0] == loaded.bos_token_id and len(ids) == len(text) + 1  # one token per character
    assert loaded.decode(ids, skip_special_tokens=True) == text
    assert loaded.get_vocab() == tok.get_vocab() and loaded.eos_token_id == tok.eos_token_id


def test_demo_chain_in_test_mode_writes_its_files_reuses_cache_and_improves(tmp_path, capsys):
    cache = tmp_path / "cache"
    result = run_demo(
        str(tmp_path / "demo"), preset="test", seed=0, cache_dir=str(cache), task="addition"
    )
    out = tmp_path / "demo"
    for name in ("report.md", "results.json", "accuracy.png", "teacher_kl.png"):
        assert (out / name).is_file(), name
    saved = json.loads((out / "results.json").read_text())
    assert saved == json.loads(json.dumps(result))
    for key in ("teacher", "sft", "opd"):
        assert 0.0 <= saved[key]["accuracy"] <= 1.0
    assert saved["opd"]["steps"] == 8 and saved["sft"]["steps"] == 5
    assert saved["opd"]["curve"][0][0] == 0 and saved["opd"]["curve"][-1][0] == 8
    assert saved["seed"] == 0 and saved["wall_seconds"] > 0
    # OPD's step-0 evaluation is the SFT student's accuracy, measured the same way
    assert saved["opd"]["curve"][0][1] == saved["sft"]["accuracy"]
    report = (out / "report.md").read_text()
    assert f"| {saved['sft']['accuracy']:.1%} |" in report and "accuracy.png" in report
    # the OPD stage runs the settings' loss (the full-vocabulary reverse KL) and says so
    opd_config = json.loads((out / "opd" / "config.json").read_text())
    assert opd_config["objective"]["loss"] == saved["settings"]["opd_loss"] == "full"
    assert "objective.loss=full" in report
    # a real improvement on a tiny budget: the student's KL to the teacher falls
    kl = [v for _, v in saved["opd"]["teacher_kl"]]
    assert sum(kl[-3:]) / 3 < sum(kl[:3]) / 3, kl
    # the second run reuses the cached teacher and SFT student
    capsys.readouterr()
    again = run_demo(
        str(tmp_path / "demo2"), preset="test", seed=0, cache_dir=str(cache), task="addition"
    )
    log = capsys.readouterr().out
    assert "teacher: reusing" in log and "SFT student: reusing" in log
    assert again["teacher"]["accuracy"] == result["teacher"]["accuracy"]
    assert again["sft"]["accuracy"] == result["sft"]["accuracy"]


def test_demo_over_seeds_reports_every_seed_and_the_spread(tmp_path, capsys):
    from opd.experiments.demo_seeds import run_seeds

    doc = run_seeds(str(tmp_path / "demo"), "test", [0, 1], str(tmp_path / "cache"))
    out = capsys.readouterr().out
    assert [r["seed"] for r in doc["runs"]] == [0, 1]
    for seed in (0, 1):  # each seed is a whole demo in its own folder, with its own data
        assert (tmp_path / "demo" / f"seed-{seed}" / "results.json").is_file()
    assert doc["runs"][0]["teacher"]["path"] != doc["runs"][1]["teacher"]["path"]

    def of_teacher(r, stage):  # the test preset's 40-step teacher may score 0
        return r[stage]["accuracy"] / r["teacher"]["accuracy"] if r["teacher"]["accuracy"] else 0

    opd = [of_teacher(r, "opd") for r in doc["runs"]]
    sft = [of_teacher(r, "sft") for r in doc["runs"]]
    assert doc["spread"]["opd_of_teacher"]["min"] == min(opd)
    assert doc["spread"]["sft_of_teacher"]["max"] == max(sft)
    assert doc["spread"]["every_seed_holds"] == (min(opd) >= 0.9 and max(sft) <= 0.7)
    saved = json.loads((tmp_path / "demo" / "seeds.json").read_text())
    assert saved["seeds"] == [0, 1] and "| 1 |" in (tmp_path / "demo" / "seeds.md").read_text()
    assert "OPD / teacher: median" in out


def test_the_demo_runs_the_two_path_task_and_experiments_the_addition_task_by_default():
    parse = build_parser().parse_args
    assert parse(["demo"]).task == "two-paths"
    assert parse(["demo", "--task", "addition"]).task == "addition"
    assert parse(["experiment", "math", "--out", "x"]).task == "addition"


def test_demo_on_the_two_path_task(tmp_path):
    """--task two-paths: the teacher learns every problem written both ways, every stage scores
    with the one verifier that reads either path, and OPD gives sequence-level credit."""
    cache = str(tmp_path / "cache")
    r = run_demo(str(tmp_path / "demo"), preset="test", cache_dir=cache)  # the default task
    teacher_run = Path(r["teacher"]["path"]).parent / "run"
    data = json.loads((teacher_run / "config.json").read_text())["data"]["prompts"]
    rows = [json.loads(x) for x in Path(data).read_text().splitlines()]
    task = Addition(2, answer_line=False)
    assert len(rows) == 2 * PRESETS["test"].n_train
    for trace, sums in zip(rows[::2], rows[1::2], strict=True):
        assert trace["prompt"] == sums["prompt"] and sums["completion"].startswith(",")
        a, b = map(int, trace["prompt"][:-1].split("+"))
        assert trace["completion"] == task.solution(a, b) and sums["completion"] == task.sums(a, b)
        assert extract_either_answer(sums["completion"]) == task.answer(a, b)
    opd = json.loads((tmp_path / "demo" / "opd" / "config.json").read_text())
    assert opd["objective"]["loss"] == "sampled" and opd["objective"]["discount"] == 1.0
    assert opd["eval"]["extractor"] == "opd.tasks.addition:extract_either_answer"
    sft = json.loads((Path(r["sft"]["path"]).parent / "run" / "config.json").read_text())
    assert sft["eval"]["extractor"] == opd["eval"]["extractor"]
    # the SFT stage: a fixed budget at its own rate, no early stop and no checks on the way
    assert sft["optim"]["lr"] == 1e-3 and sft["eval"]["prompts"] == ""
    assert r["sft"]["steps"] == PRESETS["test"].sft_steps
    assert "lr 0.001, for a fixed 5 steps" in (tmp_path / "demo" / "report.md").read_text()
    student = json.loads((Path(r["sft"]["path"]) / "config.json").read_text())
    assert student["num_hidden_layers"] == 1
    assert r["task"] == "2-digit addition, two paths (trace+sums), a 1-layer student"
    assert "objective.discount=1: sequence-level" in (tmp_path / "demo" / "report.md").read_text()
    # the one-path task's stages are cached under other keys
    one = prepare(PRESETS["test"], 0, cache, True, lambda msg: None)
    assert one.teacher != Path(r["teacher"]["path"]) and one.sft != Path(r["sft"]["path"])
    bad = replace(PRESETS["test"], paths="trace+direct")
    with pytest.raises(OpdError, match="Settings.paths='trace\\+direct': one of"):
        prepare(bad, 0, cache, True, lambda msg: None)
