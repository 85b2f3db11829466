"""The exact vocabulary losses through a served teacher: `opd serve-teacher`'s
/v1/opd/vocab_logprobs, and objective.loss=full|jsd run against it as against the same teacher
in-process (teachers/served_vocab.py)."""

from __future__ import annotations

import json

import httpx
import pytest
import torch

from opd.build import build_run
from opd.config import build_config
from opd.distributed import DistContext
from opd.errors import OpdError
from opd.models import load_model, load_tokenizer
from opd.serve import TeacherScorer, create_app
from opd.teachers.local import LocalTeacher
from opd.teachers.served import ServedTeacher
from opd.teachers.served_vocab import ServedVocab, decode
from opd.train import distill

from .test_served import batch, serving  # noqa: F401  (the batch fixture)


@pytest.fixture(scope="module")
def served(models):
    model, tok = load_model(str(models["teacher"])), load_tokenizer(str(models["teacher"]))
    with serving(create_app(TeacherScorer(model, tok), max_logprobs=5, max_rows=64)) as url:
        yield model, tok, url


def ask(url, payload):
    return httpx.post(url + "/opd/vocab_logprobs", json={"model": "teacher", **payload})


def test_whole_vocabulary_log_probs_are_the_models(served):
    model, tok, url = served
    rows = [tok("abc=cba")["input_ids"], tok("hello")["input_ids"]]
    positions = [[1, 4, 8], [2, 6]]
    r = ask(url, {"prompt": rows, "positions": positions})
    assert r.status_code == 200, r.text
    got = decode(r)
    want = []
    with torch.no_grad():
        for row, pos in zip(rows, positions, strict=True):
            lp = torch.log_softmax(model(torch.tensor([row])).logits[0].float(), -1)
            want.append(lp[torch.tensor(pos) - 1, : len(tok)])
    torch.testing.assert_close(got, torch.cat(want), atol=1e-5, rtol=0)
    assert len(r.content) < got.numel() * 4  # compressed (zlib)
    some = ask(url, {"prompt": rows[:1], "positions": [[1, 4]], "token_ids": [[[3, 5], [7, 2]]]})
    torch.testing.assert_close(decode(some), want[0][:2].gather(1, torch.tensor([[3, 5], [7, 2]])))
    mixed = ask(url, {"prompt": rows, "positions": [[], [2]], "token_ids": [[], [[4, 9]]]})
    assert mixed.status_code == 200, mixed.text  # a row asking for nothing is fine
    torch.testing.assert_close(decode(mixed), want[1][:1].gather(1, torch.tensor([[4, 9]])))


@pytest.mark.parametrize(
    "payload, code, says",
    [
        ({"prompt": [[5, 6]], "positions": [[3]]}, 400, "positions[0] must be integers in [1, 2]"),
        ({"prompt": [[5, 6]], "positions": [[0]]}, 400, "positions[0] must be integers in [1, 2]"),
        ({"prompt": [[5, 6]]}, 400, "positions must be a list"),
        ({"prompt": [5, 6], "positions": [[1]]}, 400, "prompt must be a list of token-id lists"),
        ({"prompt": [[5, 999]], "positions": [[1]]}, 400, "outside the vocabulary"),
        ({"prompt": [[5, 6]], "positions": [[1]], "token_ids": [[[1, 99]]]}, 400, "not an id"),
        (
            {"prompt": [[5, 6], [5, 6]], "positions": [[1], [1]], "token_ids": [[[1, 2]], [[1]]]},
            400,
            "token_ids[1]: every position must ask for as many ids",
        ),
        ({"prompt": [[5, 6, 7]], "positions": [[1, 2]]}, 413, "110 log-probs asked for"),
    ],
)
def test_bad_vocab_requests_are_answered_with_the_reason(served, payload, code, says, monkeypatch):
    from opd import serve

    _, _, url = served
    monkeypatch.setattr(serve, "MAX_VOCAB_FLOATS", 100)  # 2 positions x 55 ids is more
    r = ask(url, payload)
    assert r.status_code == code and says in r.json()["error"]["message"], r.text


def test_full_and_jsd_losses_through_a_served_teacher_equal_in_process(
    models, prompts_file, served, tmp_path
):
    _, _, url = served

    def first_step(teacher, out, loss):
        flags = {
            "model.student": str(models["student"]), "model.teacher": teacher,
            "data.prompts": str(prompts_file), "run.out": str(out), "run.steps": 1,
            "data.batch_prompts": 8, "sampling.group_size": 2, "sampling.max_new_tokens": 8,
            "objective.loss": loss, "remote.batch_rows": 5,
            "run.preflight": teacher.startswith("http"),  # through the wrapper, served
        }  # fmt: skip
        distill(build_config(None, flags, []))
        return json.loads((out / "metrics.jsonl").read_text().splitlines()[0])

    for loss in ("full", "jsd"):
        local = first_step(str(models["teacher"]), tmp_path / f"l-{loss}", loss)
        remote = first_step(url, tmp_path / f"r-{loss}", loss)
        assert remote["loss"] == pytest.approx(local["loss"], abs=1e-5), loss
        assert remote["teacher/kl"] == pytest.approx(local["teacher/kl"], abs=1e-5), loss
        assert remote["optim/grad_norm"] == pytest.approx(local["optim/grad_norm"], rel=1e-4)


def test_the_served_logits_are_the_in_process_ones_at_every_position(served, batch):  # noqa: F811
    model, tok, url = served
    teacher = ServedVocab(ServedTeacher(url, batch_rows=3))
    fn, lp = teacher.logits(batch)
    want_fn, want_lp = LocalTeacher(model, len(tok)).logits(batch)
    m = batch.completion_mask_BT
    torch.testing.assert_close(lp[m], want_lp[m], atol=1e-5, rtol=0)
    rows_N, cols_N = m.nonzero(as_tuple=True)
    torch.testing.assert_close(
        fn(rows_N, cols_N), torch.log_softmax(want_fn(rows_N, cols_N), -1), atol=1e-5, rtol=0
    )
    assert teacher.served.bytes_received > 0
    teacher.close()


def test_a_server_without_whole_vocabulary_log_probs_is_refused_before_step_1(
    models, prompts_file, served, tmp_path, monkeypatch
):
    """A 404 where the call should be (vLLM, SGLang; here a path no server has): one line
    naming what to do instead; the real vLLM's answer is in test_vllm.py."""
    from opd.teachers import served_vocab

    _, _, url = served
    monkeypatch.setattr(served_vocab, "PATH", "/opd/no_such_endpoint")
    flags = {
        "model.student": str(models["student"]), "model.teacher": url,
        "data.prompts": str(prompts_file), "run.out": str(tmp_path / "r"),
        "objective.loss": "full",
    }  # fmt: skip
    with pytest.raises(OpdError, match="needs the teacher's log-probs over the whole vocabulary"):
        build_run(build_config(None, flags, []), DistContext())
    assert not (tmp_path / "r").exists()
