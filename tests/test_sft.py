"""`opd sft`: on the rows' completions (training a model from scratch) and on teacher samples."""

import json

import pytest

from opd.cli import main

from .conftest import words, write_jsonl


def sft_on_data(models, data, out, steps, *extra):
    """`opd sft` of the random tiny student on the rows' own completions."""
    args = ["sft", "--student", str(models["student"]), "--prompts", str(data), "--out", str(out)]
    return [
        *args,
        "--steps",
        str(steps),
        "--batch-prompts",
        "16",
        "--max-new-tokens",
        "6",
        "--lr",
        "1e-2",
        *extra,
    ]


def sft_from_pattern_teacher(models, prompts, out, steps, *extra):
    """`opd sft` of the random tiny student on samples of the teacher that always writes "xyz"."""
    args = ["sft", "--student", str(models["student"]), "--teacher", str(models["pattern"])]
    return [*args, "--prompts", str(prompts), "--out", str(out), "--steps", str(steps), *extra]


def xyz_rows(tmp_path):
    rows = [{"prompt": w + "=", "completion": "xyz", "answer": "xyz"} for w in words(64)]
    return write_jsonl(tmp_path / "gold.jsonl", rows)


def test_sft_on_completions_learns_the_data(models, tmp_path, capsys):
    data, out = xyz_rows(tmp_path), tmp_path / "sft"
    extra = [f"eval.prompts={data}", "eval.every=15", "eval.limit=16"]
    with pytest.raises(SystemExit) as exc:
        main(sft_on_data(models, data, out, 30, *extra))
    assert exc.value.code == 0, capsys.readouterr().err
    m = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert m[0]["step"] == 0 and m[0]["eval/accuracy"] == 0.0  # evaluated before training
    assert [r["step"] for r in m if "eval/accuracy" in r] == [0, 15, 30]
    assert m[-1]["loss"] < 0.1 * m[1]["loss"]  # the NLL of the targets collapses
    assert m[-1]["eval/accuracy"] == 1.0
    assert "teacher/kl" not in m[1]


def test_sft_on_teacher_samples(models, prompts_file, tmp_path, capsys):
    out = tmp_path / "sft"
    extra = ["--batch-prompts", "8", "--group-size", "2", "--max-new-tokens", "6", "--lr", "1e-2"]
    with pytest.raises(SystemExit) as exc:
        main(sft_from_pattern_teacher(models, prompts_file, out, 25, *extra))
    assert exc.value.code == 0, capsys.readouterr().err
    m = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # the teacher always writes "xyz" + EOS: 4 tokens a row, and the student learns to copy it
    assert all(r["tokens/mean_completion_len"] == pytest.approx(4.0, abs=0.5) for r in m)
    assert m[-1]["loss"] < 0.2 * m[0]["loss"]


def test_sft_without_teacher_needs_completions(models, prompts_file, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(
            [
                "sft",
                "--student",
                str(models["student"]),
                "--prompts",
                str(prompts_file),
                "--out",
                str(tmp_path / "o"),
                "--steps",
                "1",
            ]
        )
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and "train.jsonl:1" in err and "'completion'" in err
    assert len(err.splitlines()) == 1


def test_eval_stop_at_ends_the_run_early_and_stays_complete(models, tmp_path, capsys):
    data, out = xyz_rows(tmp_path), tmp_path / "sft"
    extra = [f"eval.prompts={data}", "eval.every=5", "eval.limit=16", "eval.stop_at=1.0"]
    args = sft_on_data(models, data, out, 200, *extra)
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 0
    m = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert m[-1]["eval/accuracy"] == 1.0 and m[-1]["eval/stopped"] is True
    assert m[-1]["step"] < 200 and m[-1]["step"] % 5 == 0
    assert all(r.get("eval/accuracy", 0) < 1.0 for r in m[:-1])  # it stopped at the first pass
    assert (out / "final" / "model.safetensors").is_file()
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(args)
    assert "already complete" in capsys.readouterr().out


def test_eval_settings_need_scorable_prompts(models, prompts_file, tmp_path, capsys):
    base = sft_from_pattern_teacher(models, prompts_file, tmp_path / "o", 2)
    no_answers = write_jsonl(tmp_path / "na.jsonl", [{"prompt": "ab="}])
    for extra, needle in (
        (["eval.every=5"], "eval.every=5: must be 0 when eval.prompts is not set"),
        ([f"eval.prompts={no_answers}"], "no row has an 'answer'"),
        ([f"eval.prompts={tmp_path / 'missing.jsonl'}"], "eval.prompts: prompts file not found"),
        ([f"eval.prompts={prompts_file}", "eval.extractor=:foo"], "could not be imported"),
        ([f"eval.prompts={prompts_file}", "eval.extractor=os:sep"], "is not a function"),
    ):
        with pytest.raises(SystemExit) as exc:
            main(base + extra)
        err = capsys.readouterr().err.strip()
        assert exc.value.code == 2 and len(err.splitlines()) == 1 and needle in err, err
    assert not (tmp_path / "o").exists()


def test_stop_at_is_checked_before_the_first_step(models, tmp_path, capsys):
    rows = [{"prompt": w + "=", "completion": "x", "answer": ""} for w in words(8)]
    data = write_jsonl(tmp_path / "d.jsonl", rows)  # the empty answer: any output scores 1.0
    out = tmp_path / "o"
    extra = [
        f"eval.prompts={data}",
        "eval.extractor=opd.tasks.addition:extract_answer",
        "eval.stop_at=1.0",
    ]
    with pytest.raises(SystemExit) as exc:
        main(sft_on_data(models, data, out, 5, *extra))
    assert exc.value.code == 0, capsys.readouterr().err
    m = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(m) == 1 and m[0]["step"] == 0 and m[0]["eval/stopped"] is True
    assert (out / "final" / "model.safetensors").is_file()


def test_rows_completions_come_on_the_runs_device(models, tmp_path):
    """SFT on data builds its batch from the rows; it must land on run.device like a sampled
    batch (it stayed on the CPU and failed at step 1 on CUDA). The meta device stands in for a
    GPU here: any tensor left behind on the CPU shows."""
    import torch

    from opd.build import make_token_source
    from opd.config import build_config
    from opd.data import load_prompts
    from opd.distributed import DistContext
    from opd.models import load_tokenizer

    data = xyz_rows(tmp_path)
    flags = {"model.student": str(models["student"]), "data.prompts": str(data)}
    flags |= {"run.out": str(tmp_path / "o"), "objective.kind": "sft"}
    cfg = build_config(None, flags, [])
    tok = load_tokenizer(str(models["student"]), "model.student")
    prompts, _ = load_prompts(str(data), tok, max_completion_tokens=8)
    ctx = DistContext(device=torch.device("meta"))
    sampler, _ = make_token_source(cfg, ctx, tok, len(tok), None, None, True, None)
    batch = sampler.sample(prompts[:4], 1, torch.Generator())
    for name, value in vars(batch).items():
        if torch.is_tensor(value):
            assert value.device.type == "meta", name


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA device")
def test_sft_on_completions_runs_on_cuda(models, tmp_path, capsys):
    data, out = xyz_rows(tmp_path), tmp_path / "sft"
    with pytest.raises(SystemExit) as exc:
        main(sft_on_data(models, data, out, 2, "run.device=cuda"))
    assert exc.value.code == 0, capsys.readouterr().err
