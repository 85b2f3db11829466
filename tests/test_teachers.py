"""Several teachers: rows go to the teacher their prompt names, metrics per teacher, errors."""

from __future__ import annotations

import json

import pytest
import torch

from opd.build import build_run as setup_run
from opd.config import build_config
from opd.distributed import DistContext
from opd.errors import OpdError
from opd.teachers import teacher_specs
from opd.train import distill

from .conftest import words, write_jsonl


def mixed_prompts(path, names):
    rows = []
    for i, w in enumerate(words(32)):
        row = {"prompt": w + "=", "answer": w[::-1]}
        if names[i % len(names)]:
            row["teacher"] = names[i % len(names)]
        rows.append(row)
    return write_jsonl(path, rows)


def flags(models, prompts, out, **extra):
    return {
        "model.student": str(models["student"]),
        "model.teacher": str(models["teacher"]),
        "model.teachers": f"xyz={models['pattern']}",
        "data.prompts": str(prompts),
        "run.out": str(out),
        "data.batch_prompts": 8,
        "sampling.group_size": 2,
        "sampling.max_new_tokens": 6,
        **extra,
    }


def test_each_row_is_scored_by_its_prompts_teacher(models, tmp_path):
    prompts = mixed_prompts(tmp_path / "p.jsonl", [None, "xyz"])
    parts = setup_run(build_config(None, flags(models, prompts, tmp_path / "r"), []), DistContext())
    batch = parts.sampler.sample(parts.prompts[:8], 2, torch.Generator().manual_seed(0))
    names = [p.row.get("teacher", "default") for p in parts.prompts[:8]]
    names_B = parts.teacher.names(batch, names)
    assert names_B[:4] == ("default", "default", "xyz", "xyz")
    routed = parts.teacher.score(batch, names_B)
    by_default = parts.teacher.teachers["default"].score(batch)
    by_xyz = parts.teacher.teachers["xyz"].score(batch)
    want = torch.where(torch.tensor([n == "xyz" for n in names_B])[:, None], by_xyz, by_default)
    torch.testing.assert_close(routed, want, atol=1e-6, rtol=0)
    assert not torch.allclose(by_default, by_xyz)  # the two teachers really differ


def test_full_vocabulary_logits_come_from_each_rows_teacher(models, tmp_path):
    """loss=full with two in-process teachers: the batch's teacher logits at any completion
    position are its row's teacher's, also through a micro-batch's slice of the batch."""
    from opd.logprobs import completion_logits

    prompts = mixed_prompts(tmp_path / "p.jsonl", [None, "xyz"])
    cfg = build_config(
        None, flags(models, prompts, tmp_path / "r", **{"objective.loss": "full"}), []
    )
    run = setup_run(cfg, DistContext())
    batch = run.sampler.sample(run.prompts[:8], 2, torch.Generator().manual_seed(0))
    scored = run.score(batch, run.prompts[:8])
    assert batch.teacher_logits is None  # the sampled batch is left as it was
    rows_N, cols_N = scored.completion_mask_BT.nonzero(as_tuple=True)
    got_NV = scored.teacher_logits(rows_N, cols_N)
    args = (batch.tokens_BT, batch.attention_mask_BT, batch.prompt_len)
    for name in ("default", "xyz"):
        mine_N = torch.tensor([scored.teacher_B[r] == name for r in rows_N.tolist()])
        assert mine_N.any()
        with torch.no_grad():
            ref_BCV = completion_logits(run.teacher.teachers[name].model, *args)
        want = ref_BCV[rows_N[mine_N], cols_N[mine_N] - batch.prompt_len, : run.vocab_size]
        torch.testing.assert_close(got_NV[mine_N], want, atol=1e-5, rtol=1e-5)
    mb = scored.slice(5, 12)  # a micro-batch: its rows count from 0
    r_n, c_n = mb.completion_mask_BT.nonzero(as_tuple=True)
    torch.testing.assert_close(mb.teacher_logits(r_n, c_n), got_NV[(rows_N >= 5) & (rows_N < 12)])


def test_run_logs_kl_per_teacher(models, tmp_path):
    prompts = mixed_prompts(tmp_path / "p.jsonl", [None, "xyz"])
    out = tmp_path / "run"
    distill(build_config(None, flags(models, prompts, out, **{"run.steps": 2}), []))
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert {"teacher/kl", "teacher/kl/default", "teacher/kl/xyz"} <= row.keys()
    lo, hi = sorted([row["teacher/kl/default"], row["teacher/kl/xyz"]])
    assert lo <= row["teacher/kl"] <= hi


def test_unknown_teacher_name_names_the_line(models, tmp_path):
    prompts = mixed_prompts(tmp_path / "p.jsonl", [None, "nobody"])
    with pytest.raises(OpdError, match=r"p.jsonl:2: teacher 'nobody' is not configured"):
        setup_run(build_config(None, flags(models, prompts, tmp_path / "r"), []), DistContext())
    assert not (tmp_path / "r").exists()


def test_teacher_specs_parse_and_reject():
    assert teacher_specs("/t", " a=/x , b=http://h:1/v1") == {
        "default": "/t",
        "a": "/x",
        "b": "http://h:1/v1",
    }
    for bad, words_ in [("a", "not name="), ("a=/x,a=/y", "named twice"), ("=x", "not name=")]:
        with pytest.raises(OpdError, match=words_):
            teacher_specs("/t", bad)


def test_full_vocabulary_loss_needs_in_process_teachers(models, prompts_file, tmp_path):
    cfg = build_config(
        None,
        flags(models, prompts_file, tmp_path / "r")
        | {
            "model.teachers": "",
            "model.teacher": "http://127.0.0.1:9/v1",
            "objective.loss": "full",
        },
        ["remote.retries=0"],
    )
    with pytest.raises(OpdError, match="teacher http://127.0.0.1:9/v1"):
        setup_run(cfg, DistContext())  # the server is asked for its model first: unreachable


def test_opd_check_reports_every_check_and_how_another_tokenizer_aligns(
    models, prompts_file, tmp_path, capsys
):
    from opd import tiny
    from opd.cli import main

    def check(teacher):
        with pytest.raises(SystemExit) as e:
            main(["check", "--student", str(models["student"]), "--teacher", str(teacher),
                  "--prompts", str(prompts_file)])  # fmt: skip
        return e.value.code, capsys.readouterr().out

    code, out = check(models["padded"])
    assert code == 0, out
    for line in ("tokenizers  ", "chat templates", "embeddings", "teacher self-KL [default]"):
        assert line in out
    assert "rows beyond the tokenizer are padding" in out and "FAIL" not in out
    other_tok = tiny.char_tokenizer(chars=tiny.CHARS + "#")
    other = tiny.save(tiny.tiny_model(other_tok, hidden=32, layers=1), other_tok, tmp_path / "o")
    code, out = check(other)  # another tokenizer: scored across tokenizers, not refused
    assert code == 0 and "FAIL" not in out, out
    assert "another tokenizer (student has 55 tokens, teacher has 56): scored across" in out
    assert "alignment" in out and "shared spans" in out
