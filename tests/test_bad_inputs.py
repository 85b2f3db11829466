"""Inputs an adversarial sweep found (issue 20), each a one-line error through the command line:
exit 2, the cause named, no traceback, and refused before the work it would spoil or swamp."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from opd import build, data, evaluate
from opd.cli import main
from opd.errors import OpdError
from opd.fast.decode import KVCacheSampler
from opd.models import load_model
from opd.samplers.hf import HFSampler

from .conftest import write_jsonl
from .test_cli import assert_one_line_error, call, distill_args


def never(*args, **kwargs):
    raise AssertionError("reached work that the bad input should have prevented")


@pytest.fixture()
def no_model_loads(monkeypatch):
    """The error must come before any model loads."""
    monkeypatch.setattr(build, "load_model", never)
    monkeypatch.setattr(evaluate, "load_model", never)


def lines_file(tmp_path: Path, *lines: str) -> Path:
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(line + "\n" for line in lines))
    return path


@pytest.mark.parametrize(
    "line,needles",
    [
        ('{"prompt": "ab=", "x": ' + "[" * 200_000 + "]" * 200_000 + "}", ["nested too deeply"]),
        ('{"prompt": "ab=", "answer": ' + "7" * 5000 + "}", ["more digits", "as a string"]),
        ('{"prompt": "ab\\ud800="}', ["'prompt' holds a lone surrogate '\\ud800'"]),
        ('{"messages": [{"role": "user", "content": "\\udfff"}]}', ["messages[0].content"]),
        (
            '{"prompt": "ab=", "answer": {"x": 1}}',
            ["'answer' must be a string or a number", "dict"],
        ),
        ('{"prompt": "ab=", "answer": [1, 2]}', ["'answer' must be a string or a number", "list"]),
        ('{"prompt": "ab=", "answer": true}', ["'answer' must be a string or a number", "bool"]),
        ('{"prompt": "ab=", "answer": NaN}', ["'answer' is nan, not a finite number"]),
        ('{"prompt": "ab=", "teacher": ["x"]}', ["'teacher' must be a string, got list"]),
        ('{"prompt": "ab=", "completion": 3}', ["'completion' must be a string, got int"]),
    ],
)
def test_bad_rows_are_refused_before_any_model_loads(
    models, tmp_path, capsys, no_model_loads, line, needles
):
    prompts = lines_file(tmp_path, '{"prompt": "cd="}', line)
    code, err = call(distill_args(models, prompts, tmp_path / "out"), capsys)
    assert_one_line_error(code, err, "bad.jsonl:2", *needles)
    assert not (tmp_path / "out").exists()


def test_a_50_mb_line_is_refused_unread_and_fast(models, tmp_path, capsys, no_model_loads):
    prompts = lines_file(tmp_path, '{"prompt": "ab="}', json.dumps({"prompt": "a" * 50_000_000}))
    t0 = time.perf_counter()
    code, err = call(distill_args(models, prompts, tmp_path / "out"), capsys)
    assert_one_line_error(code, err, "bad.jsonl:2", "longer than 16 MiB")
    assert time.perf_counter() - t0 < 30  # tokenising it took minutes and gigabytes


def test_a_long_prompt_is_refused_by_its_bytes_before_it_is_tokenised(
    models, tmp_path, capsys, monkeypatch
):
    encode = data.Encoder.prompt

    def short_ones_only(self, text, *args):
        assert len(text) < 10_000, "a 5 MB prompt was tokenised"
        return encode(self, text, *args)

    monkeypatch.setattr(data.Encoder, "prompt", short_ones_only)
    prompts = lines_file(tmp_path, '{"prompt": "ab="}', json.dumps({"prompt": "ab" * 2_500_000}))
    code, err = call(distill_args(models, prompts, tmp_path / "out"), capsys)
    assert_one_line_error(
        code, err, "bad.jsonl:2: prompt is 5000000 bytes, far more than 248 tokens can hold"
    )


def test_text_outside_the_vocabulary_is_an_error_unless_mapped_and_counted(
    models, tmp_path, capsys
):
    prompts = lines_file(tmp_path, '{"prompt": "ab="}', '{"prompt": "c\\u20acd\\u20ac="}')
    code, err = call(
        distill_args(models, prompts, tmp_path / "a", 1, "--batch-prompts", "2"), capsys
    )
    assert_one_line_error(
        code, err, "bad.jsonl:2", "no token for: '\u20ac' (U+20AC)", "data.unknown_chars=unk"
    )
    out = tmp_path / "b"
    args = distill_args(models, prompts, out, 1, "--batch-prompts", "2", "data.unknown_chars=unk")
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 0
    err = capsys.readouterr().err
    assert "data.prompts: 2 tokens are the unknown token '<unk>'" in err
    assert "opd: memory: about" in err  # the step's rough memory estimate, one line
    (row,) = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert row["data/unknown_tokens"] == 2  # both rows are in the step, once each


def test_the_literal_unknown_token_text_is_not_an_unknown_character(tok):
    from opd.data import Encoder

    ids, unknown = Encoder(tok).prompt("a<unk>b", True, "x:1")
    assert tok.unk_token_id in ids and unknown == 0


def test_more_prompts_a_step_than_the_file_has_are_cut_to_the_file(
    models, prompts_file, tmp_path, capsys
):
    """--batch-prompts 1000000 on a 64-row file ran a machine out of memory; now a step takes
    the file's 64 prompts once each, and says so."""
    out = tmp_path / "out"
    args = distill_args(models, prompts_file, out, 1, "--batch-prompts", "1000000")
    with pytest.raises(SystemExit) as exc:
        main([*args, "run.preflight=false"])
    assert exc.value.code == 0
    err = capsys.readouterr().err
    assert "data.batch_prompts=1000000 is more than the 64 prompts" in err
    assert "each step takes 64 of them (x sampling.group_size=2 samples)" in err
    (row,) = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert row["tokens/completion"] <= 64 * 2 * 8  # 64 prompts x 2 samples x 8 tokens at most
    saved = json.loads((out / "config.json").read_text())
    assert saved["data"]["batch_prompts"] == 1000000  # what was asked: the same run resumes


def test_a_step_takes_the_prompts_left_after_skipping_overlong_ones(models, tmp_path, capsys):
    prompts = lines_file(tmp_path, '{"prompt": "ab="}', json.dumps({"prompt": "a" * 300}))
    args = distill_args(models, prompts, tmp_path / "out", 1, "--batch-prompts", "2")
    with pytest.raises(SystemExit) as exc:
        main([*args, "--overlong", "skip"])
    assert exc.value.code == 0
    assert "each step takes 1 of them" in capsys.readouterr().err


def test_max_new_tokens_beyond_the_context(models, prompts_file, tmp_path, capsys):
    args = distill_args(models, prompts_file, tmp_path / "out", 1, "--max-new-tokens", "1000000000")
    assert_one_line_error(
        *call(args, capsys), "sampling.max_new_tokens=1000000000 leaves no room",
        "256-token context", "at most 255",
    )  # fmt: skip
    code, err = call(
        ["eval", "--model", str(models["teacher"]), "--prompts", str(prompts_file),
         "--max-new-tokens", "1000000000"], capsys,
    )  # fmt: skip
    assert_one_line_error(code, err, "--max-new-tokens=1000000000 leaves no room", "at most 255")


def test_a_step_that_cannot_fit_is_refused_with_what_it_needs(
    models, prompts_file, tmp_path, capsys, monkeypatch
):
    for sampler in (KVCacheSampler, HFSampler):  # sampling 10**9 rows would swamp the machine
        monkeypatch.setattr(sampler, "sample", never)
    args = distill_args(models, prompts_file, tmp_path / "out", 1, "--batch-prompts", "1")
    args[args.index("--group-size") + 1] = str(10**9)
    code, err = call([*args, "run.preflight=false"], capsys)
    assert_one_line_error(
        code, err, "a step needs at least", "sampling.group_size=1000000000", "GB of cpu memory"
    )
    assert not (tmp_path / "out").exists()


def test_eval_out_naming_a_folder_fails_before_the_evaluation(
    models, prompts_file, tmp_path, capsys, no_model_loads
):
    folder = tmp_path / "results"
    folder.mkdir()
    args = ["eval", "--model", str(models["teacher"]), "--prompts", str(prompts_file)]
    assert_one_line_error(*call([*args, "--out", str(folder)], capsys), "is a folder")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this torch sees a CUDA device")
def test_cuda_on_a_build_without_it(models, prompts_file, capsys, no_model_loads):
    args = ["eval", "--model", str(models["teacher"]), "--prompts", str(prompts_file)]
    code, err = call([*args, "--device", "cuda"], capsys)
    assert_one_line_error(code, err, "--device=cuda: torch sees no CUDA device")
    with pytest.raises(OpdError, match="torch sees no CUDA device"):
        load_model(str(models["teacher"]), device="cuda")


def test_corrupt_weights_are_named_as_such(models, prompts_file, tmp_path, capsys):
    broken = Path(shutil.copytree(models["teacher"], tmp_path / "broken"))
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[:100])
    args = distill_args(models, prompts_file, tmp_path / "out", 1)
    args[args.index("--teacher") + 1] = str(broken)
    assert_one_line_error(
        *call(args, capsys), "model.teacher", "model.safetensors is not a valid safetensors file"
    )


def unreadable_run(args: list[str]) -> subprocess.CompletedProcess:
    """`opd ARGS` where a mode-000 file cannot be read: as root, with the capabilities that
    override file permissions dropped (root reads any file otherwise)."""
    cmd = [sys.executable, "-m", "opd", *args]
    if os.geteuid() == 0:
        if not shutil.which("setpriv"):
            pytest.skip("running as root without setpriv: a mode-000 file stays readable")
        caps = "-dac_override,-dac_read_search"
        cmd = ["setpriv", f"--bounding-set={caps}", f"--inh-caps={caps}", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


def test_unreadable_prompts_and_weights_are_named_as_unreadable(models, prompts_file, tmp_path):
    prompts = Path(shutil.copy(prompts_file, tmp_path / "locked.jsonl"))
    prompts.chmod(0)
    r = unreadable_run(distill_args(models, prompts, tmp_path / "out", 1))
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        f"opd: error: cannot read prompts file {prompts} (Permission denied)"
    ], r.stderr
    locked = Path(shutil.copytree(models["teacher"], tmp_path / "locked"))
    (locked / "model.safetensors").chmod(0)
    args = distill_args(models, prompts_file, tmp_path / "out", 1)
    args[args.index("--teacher") + 1] = str(locked)
    r = unreadable_run(args)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        f"opd: error: model.teacher: cannot read {locked / 'model.safetensors'} (Permission denied)"
    ], r.stderr


def test_a_prompts_path_that_is_a_folder(models, tmp_path, capsys, no_model_loads):
    args = distill_args(models, tmp_path, tmp_path / "out", 1)
    assert_one_line_error(*call(args, capsys), "data.prompts", "is a folder, not a prompts file")


def test_eval_rows_are_checked_alike(models, tmp_path, capsys, no_model_loads):
    prompts = write_jsonl(tmp_path / "e.jsonl", [{"prompt": "ab=", "answer": [1]}])
    args = ["eval", "--model", str(models["teacher"]), "--prompts", str(prompts)]
    assert_one_line_error(*call(args, capsys), "e.jsonl:1", "'answer' must be")
