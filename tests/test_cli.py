"""End-to-end: `opd distill` and `opd eval` in subprocesses, resume, LoRA, and every bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from opd import tiny
from opd.cli import main

from .conftest import write_jsonl

SMALL = ["--batch-prompts", "4", "--group-size", "2", "--max-new-tokens", "8", "--lr", "1e-3"]


def distill_args(models, prompts, out, steps=3, *extra):
    return [
        "distill",
        "--student",
        str(models["student"]),
        "--teacher",
        str(models["teacher"]),
        "--prompts",
        str(prompts),
        "--out",
        str(out),
        "--steps",
        str(steps),
        *SMALL,
        *extra,
    ]


def run_cli(args, timeout=300):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", "opd", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def test_three_step_run_writes_every_file(models, prompts_file, tmp_path):
    out = tmp_path / "run"
    r = run_cli(distill_args(models, prompts_file, out, 3, "--save-every", "2"))
    assert r.returncode == 0, r.stderr
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["run"]["steps"] == 3 and cfg["model"]["student"] == str(models["student"])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for key in (
        "teacher/kl",
        "loss",
        "optim/lr",
        "optim/grad_norm",
        "ratio/mean",
        "ratio/max",
        "tokens/completion",
        "time/sample",
        "time/teacher",
        "time/train",
    ):
        assert key in rows[0], key
    assert abs(rows[0]["ratio/mean"] - 1.0) < 1e-4  # on-policy before the first update
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_000002", "step_000003"]
    ckpt = out / "checkpoints" / "step_000003"
    assert sorted(p.name for p in ckpt.iterdir()) == [  # no RNG state or data cursor: unused
        "optimizer.safetensors",
        "state.json",
        "trainable.safetensors",
    ]
    assert "data_cursor" not in json.loads((ckpt / "state.json").read_text())
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out / "final")
    AutoTokenizer.from_pretrained(out / "final")
    before = weights(models["student"])
    after = model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # it trained
    # running the finished command again does nothing and says so
    again = run_cli(distill_args(models, prompts_file, out, 3, "--save-every", "2"))
    assert again.returncode == 0 and "already complete" in again.stdout


def test_lora_run_final_loads_with_merged_weights(models, prompts_file, tmp_path):
    out = tmp_path / "lora"
    r = run_cli(
        distill_args(
            models,
            prompts_file,
            out,
            2,
            "--lora-rank",
            "4",
            "model.lora_target_modules=q_proj,v_proj",
        )
    )
    assert r.returncode == 0, r.stderr
    ckpt = load_file(str(out / "checkpoints" / "step_000002" / "trainable.safetensors"))
    assert ckpt and all("lora_" in k for k in ckpt)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out / "final")
    sd = model.state_dict()
    assert not any("lora" in k for k in sd)
    base = weights(models["student"])
    changed = [k for k in base if not torch.equal(base[k], sd[k])]
    assert changed and all(("q_proj" in k or "v_proj" in k) for k in changed)


def test_resume_after_kill_is_bit_identical(models, prompts_file, tmp_path):
    args = ["--save-every", "1", "--seed", "7"]
    straight = tmp_path / "straight"
    assert run_cli(distill_args(models, prompts_file, straight, 6, *args)).returncode == 0

    killed = tmp_path / "killed"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "opd", *distill_args(models, prompts_file, killed, 6, *args)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    deadline = time.time() + 120
    while not (killed / "checkpoints" / "step_000002").exists():
        assert proc.poll() is None and time.time() < deadline, "run ended before step 2"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "final").exists(), "the run finished before it could be killed"

    r = run_cli(distill_args(models, prompts_file, killed, 6, *args))
    assert r.returncode == 0, r.stderr
    assert "resuming from" in r.stdout
    a, b = weights(straight / "final"), weights(killed / "final")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = [json.loads(line) for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    ref = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    assert [r["teacher/kl"] for r in rows] == [r["teacher/kl"] for r in ref]


def test_eval_reports_accuracy_and_rows(models, tmp_path):
    prompts = write_jsonl(
        tmp_path / "p.jsonl",
        [
            {"prompt": "abc=", "answer": "cba"},
            {"prompt": "hgf=", "answer": "fgh"},
            {"prompt": "ab="},
        ],
    )
    out = tmp_path / "eval.jsonl"
    r = run_cli(
        [
            "eval",
            "--model",
            str(models["teacher"]),
            "--prompts",
            str(prompts),
            "--out",
            str(out),
            "--max-new-tokens",
            "8",
        ]
    )
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert summary["rows"] == 3 and summary["scored"] == 2 and len(rows) == 3
    assert summary["accuracy"] == sum(r.get("correct", False) for r in rows) / 2
    assert "correct" not in rows[2]
    for row in rows[:2]:
        assert row["correct"] == (row["extracted"] == row["answer"])
    # the ledger's keys: sampling FLOPs for these prompts and completions, and wall seconds
    from opd.data import load_prompts
    from opd.flops import model_shape, sampling_flops
    from opd.models import load_model, load_tokenizer

    tokenizer = load_tokenizer(str(models["teacher"]), "--model")
    prompt_lens = [len(x.ids) for x in load_prompts(str(prompts), tokenizer, None, "error")[0]]
    shape = model_shape(load_model(str(models["teacher"]), "float32", "cpu", "--model"))
    completions = [r["completion_tokens"] for r in rows]
    assert summary["flops/eval"] == sampling_flops(shape, prompt_lens, completions) > 0
    assert summary["time/eval"] > 0


# ---- bad input: one line naming the cause, exit 2, no traceback, nothing written ----


def call(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err.strip()
    return exc.value.code, err


def assert_one_line_error(code, err, *needles):
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], (n, lines[0])


@pytest.fixture()
def bad_rows(tmp_path):
    def make(lines: list[str]) -> Path:
        p = tmp_path / "bad.jsonl"
        p.write_text("\n".join(lines) + "\n")
        return p

    return make


@pytest.mark.parametrize(
    "lines,needles",
    [
        (
            ['{"prompt": "ab="}', "", '{"prompt": "ab="', '{"prompt": "c="}'],
            ["bad.jsonl:3", "invalid JSON"],
        ),
        (
            ['{"prompt": "ab="}', '{"question": "x"}'],
            ["bad.jsonl:2", "neither 'prompt' nor 'messages'"],
        ),
        (['{"prompt": "   "}'], ["bad.jsonl:1", "empty prompt"]),
        (['["ab="]'], ["bad.jsonl:1", "expected a JSON object"]),
        (['{"prompt": 5}'], ["bad.jsonl:1", "'prompt' must be a string"]),
        (
            ['{"messages": [{"role": "user", "content": "hi"}]}'],
            ["bad.jsonl:1", "no chat template"],
        ),
        (
            [json.dumps({"prompt": "a" * 300})],
            ["bad.jsonl:1", "prompt is 301 tokens", "data.overlong=skip"],
        ),
        ([""], ["bad.jsonl", "no prompts"]),
    ],
)
def test_bad_prompt_files(models, tmp_path, bad_rows, capsys, lines, needles):
    out = tmp_path / "out"
    code, err = call(distill_args(models, bad_rows(lines), out), capsys)
    assert_one_line_error(code, err, *needles)
    assert not out.exists()


def test_overlong_skip_drops_and_counts(models, tmp_path, bad_rows, capsys):
    prompts = bad_rows(
        ['{"prompt": "ab="}', json.dumps({"prompt": "a" * 300}), '{"prompt": "cd="}']
    )
    with pytest.raises(SystemExit) as exc:
        main(distill_args(models, prompts, tmp_path / "out", 1, "--overlong", "skip"))
    assert exc.value.code == 0
    assert "skipped 1 overlong prompts" in capsys.readouterr().out


@pytest.mark.parametrize(
    "extra,needles",
    [
        (["--steps", "abc"], ["run.steps", "expected an integer", "'abc'"]),
        (["--lr", "-1"], ["optim.lr=-1.0", "> 0"]),
        (["--group-size", "0"], ["sampling.group_size=0"]),
        (["--overlong", "drop"], ["data.overlong='drop'"]),
        (["nosuch.key=1"], ["unknown config key 'nosuch.key'"]),
        (["optim.schedule=linear"], ["optim.schedule='linear'"]),
        (["justtext"], ["bad override 'justtext'"]),
        (["--config", "/nonexistent.toml"], ["config file not found: /nonexistent.toml"]),
    ],
)
def test_bad_flag_values(models, prompts_file, tmp_path, capsys, extra, needles):
    out = tmp_path / "out"
    code, err = call(distill_args(models, prompts_file, out, 3, *extra), capsys)
    assert_one_line_error(code, err, *needles)
    assert not out.exists()


def test_missing_model_folder_and_non_model_folder(models, prompts_file, tmp_path, capsys):
    args = distill_args(models, prompts_file, tmp_path / "out")
    args[args.index("--teacher") + 1] = str(tmp_path / "nope")
    assert_one_line_error(*call(args, capsys), "model.teacher", "model folder not found", "nope")
    (tmp_path / "empty").mkdir()
    args[args.index("--teacher") + 1] = str(tmp_path / "empty")
    assert_one_line_error(*call(args, capsys), "not a Hugging Face model folder")


def test_tokenizers_that_differ_are_refused_for_losses_that_compare_vocabularies(
    models, prompts_file, tmp_path, capsys
):
    other_tok = tiny.char_tokenizer(chars=tiny.CHARS + "#")
    other = tiny.save(
        tiny.tiny_model(other_tok, hidden=32, layers=1), other_tok, tmp_path / "other"
    )
    args = distill_args(models, prompts_file, tmp_path / "out")
    args[args.index("--teacher") + 1] = str(other)
    assert_one_line_error(
        *call(args + ["--loss", "topk"], capsys),
        "teacher [default] has another tokenizer than the student's (student has 55 tokens, "
        "teacher has 56), and objective.loss='topk' compares vocabularies",
    )
    assert not (tmp_path / "out").exists()


def test_padded_teacher_embeddings_are_accepted(models, prompts_file, tmp_path, capsys):
    args = distill_args(models, prompts_file, tmp_path / "out", 1)
    args[args.index("--teacher") + 1] = str(models["padded"])
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 0, capsys.readouterr().err


def test_different_run_in_out_is_refused_then_force_replaces_it(
    models, prompts_file, tmp_path, capsys
):
    out = tmp_path / "out"
    with pytest.raises(SystemExit):
        main(distill_args(models, prompts_file, out, 1))
    capsys.readouterr()
    saved = (out / "config.json").read_text()
    metrics = (out / "metrics.jsonl").read_text()
    code, err = call(distill_args(models, prompts_file, out, 1, "--kl-coef", "2"), capsys)
    assert_one_line_error(code, err, "holds a different run", "objective.kl_coef")
    assert (out / "config.json").read_text() == saved and (
        out / "metrics.jsonl"
    ).read_text() == metrics
    with pytest.raises(SystemExit) as exc:
        main(distill_args(models, prompts_file, out, 1, "--kl-coef", "2", "--force"))
    assert exc.value.code == 0
    assert json.loads((out / "config.json").read_text())["objective"]["kl_coef"] == 2.0


def test_subprocess_error_has_no_traceback(models, tmp_path):
    r = run_cli(distill_args(models, tmp_path / "missing.jsonl", tmp_path / "out"))
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        f"opd: error: data.prompts: prompts file not found: {tmp_path / 'missing.jsonl'}"
    ]


def test_quickstart_smoke(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["quickstart", "--out", str(tmp_path / "qs"), "--steps", "2"])
    assert exc.value.code == 0
    result = json.loads((tmp_path / "qs" / "result.json").read_text())
    assert result["steps"] == 2 and result["teacher_accuracy"] > 0.9  # the teacher learned its task
    assert 0 <= result["student_accuracy_after"] <= 1
    assert (tmp_path / "qs" / "distill" / "final" / "model.safetensors").is_file()
    assert "| teacher |" in capsys.readouterr().out


def test_out_that_is_a_file_or_a_foreign_config_is_refused(models, prompts_file, tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("keep me")
    assert_one_line_error(
        *call(distill_args(models, prompts_file, a_file), capsys), "is not a folder"
    )
    assert a_file.read_text() == "keep me"
    folder = tmp_path / "foreign"
    folder.mkdir()
    (folder / "config.json").write_text("[1, 2]")
    assert_one_line_error(
        *call(distill_args(models, prompts_file, folder), capsys), "is not a run config"
    )
    assert (folder / "config.json").read_text() == "[1, 2]"


def test_seed_out_of_range(models, prompts_file, tmp_path, capsys):
    args = distill_args(models, prompts_file, tmp_path / "out", 1, "--seed", "20000000000000")
    assert_one_line_error(*call(args, capsys), "run.seed=20000000000000")
    assert not (tmp_path / "out").exists()


def test_steps_change_on_resume(models, prompts_file, tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.raises(SystemExit):
        main(
            distill_args(models, prompts_file, out, 2, "--save-every", "1", "optim.schedule=cosine")
        )
    capsys.readouterr()
    # cosine: the schedule depends on run.steps, so a change makes it a different run
    code, err = call(distill_args(models, prompts_file, out, 3, "optim.schedule=cosine"), capsys)
    assert_one_line_error(code, err, "run.steps differ")
    # constant: more steps extend the run; fewer than the newest checkpoint are refused
    out2 = tmp_path / "out2"
    with pytest.raises(SystemExit):
        main(distill_args(models, prompts_file, out2, 2, "--save-every", "1"))
    capsys.readouterr()
    assert_one_line_error(
        *call(distill_args(models, prompts_file, out2, 1), capsys), "past run.steps=1"
    )
    with pytest.raises(SystemExit) as exc:
        main(distill_args(models, prompts_file, out2, 3))
    assert exc.value.code == 0 and "resuming from" in capsys.readouterr().out
    rows = [json.loads(line) for line in (out2 / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]


def test_config_from_an_older_opd_without_new_keys_still_resumes(
    models, prompts_file, tmp_path, capsys
):
    out = tmp_path / "out"
    with pytest.raises(SystemExit):
        main(distill_args(models, prompts_file, out, 1))
    cfg = json.loads((out / "config.json").read_text())
    del cfg["eval"], cfg["objective"]["kind"]  # keys that did not exist yet, at their defaults
    (out / "config.json").write_text(json.dumps(cfg))
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(distill_args(models, prompts_file, out, 2))
    assert exc.value.code == 0 and "resuming from" in capsys.readouterr().out


# ---- --help: required only where config.validate requires it ----


def help_lines(command, capsys, monkeypatch):
    """`opd COMMAND --help`, one line per help entry: key -> the line with its help text."""
    monkeypatch.setenv("COLUMNS", "1000")  # argparse wraps nothing at this width
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    found = {}
    for line in text.splitlines():
        for key in (
            "model.student",
            "model.teacher",
            "model.teacher_model",
            "model.teacher_api_key",
            "model.teachers",
            "data.prompts",
            "run.out",
            "eval.prompts",
        ):  # a flag's help ends "(KEY; default)"; the epilog's lines start "KEY = default"
            if f"({key};" in line or line.strip().startswith(f"{key} ="):
                assert key not in found, (key, found[key], line)
                found[key] = line
    return found


@pytest.mark.parametrize("command", ["distill", "sft", "rl"])
def test_help_marks_only_the_keys_validate_requires_as_required(command, capsys, monkeypatch):
    lines = help_lines(command, capsys, monkeypatch)
    for key in ("model.teacher_model", "model.teacher_api_key", "model.teachers", "eval.prompts"):
        assert "required" not in lines[key], lines[key]
    for key in ("model.teacher_model", "model.teacher_api_key"):
        assert "default ''" in lines[key] or "not used by rl" in lines[key], lines[key]
    for key in ("model.teachers", "eval.prompts"):
        assert f"{key} = ''" in lines[key], lines[key]
    for key in ("model.student", "data.prompts", "run.out"):
        assert "required" in lines[key], lines[key]
    teacher = lines["model.teacher"]
    assert ("(model.teacher; required)" in teacher) == (command == "distill"), teacher


@pytest.mark.parametrize("kind", ["opd", "sft", "rl"])
def test_required_keys_are_exactly_what_validate_rejects_when_empty(kind):
    from opd import cli as cli_mod
    from opd import config as config_mod
    from opd.errors import OpdError

    need = [key for key, kinds in config_mod.REQUIRED_KEYS.items() if kind in kinds]
    flags = {key: "x" for key in need}
    config_mod.build_config(None, {**flags, "objective.kind": kind}, [])  # nothing else needed
    for key in need:
        with pytest.raises(OpdError, match=key):
            config_mod.build_config(None, {**flags, key: "", "objective.kind": kind}, [])
    text = cli_mod.fields_help(kind)
    for line in text.splitlines()[1:]:
        key = line.strip().split(" ", 1)[0]
        if not key.startswith("["):
            assert ("(required" in line) == (key in need), line
