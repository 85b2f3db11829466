"""Teacher-only context: a row's teacher_prompt / teacher_messages is what the teacher reads
before the student's completion; the student trains after its own prompt (teachers/view.py)."""

from __future__ import annotations

import json
import random

import pytest
import torch

from opd import tiny
from opd.build import build_run
from opd.config import build_config
from opd.data import load_prompts, pack
from opd.distributed import DistContext
from opd.errors import OpdError
from opd.models import load_model
from opd.samplers import make_sampler
from opd.teachers.local import LocalTeacher
from opd.teachers.view import TeacherView
from opd.train import distill

from .conftest import assert_same_topk, words, write_jsonl


@pytest.fixture(scope="module")
def setup(models, tok, tmp_path_factory):
    """Rows with a teacher prompt of other lengths than theirs, a student batch of them, and
    the same batch laid out by hand with the teacher's prompts."""
    root = tmp_path_factory.mktemp("ctx")
    rows = [
        {"prompt": w + "=", "teacher_prompt": f"{w[::-1]}:{'x' * (i % 4)}{w}="}
        for i, w in enumerate(words(8))
    ]
    path = write_jsonl(root / "p.jsonl", rows)
    prompts, _ = load_prompts(str(path), tok)
    student = load_model(str(models["student"]))
    batch = make_sampler(student, tok, len(tok), 8).sample(
        prompts, 2, torch.Generator().manual_seed(0)
    )
    rows_B = [prompts[i] for i in batch.prompt_index_B.tolist()]
    t_prompts = [tok(p.row["teacher_prompt"])["input_ids"] for p in rows_B]
    comps = [batch.tokens_BT[b][batch.completion_mask_BT[b]].tolist() for b in range(len(rows_B))]
    by_hand = pack(t_prompts, comps, tok.pad_token_id)
    return rows_B, batch, by_hand


def test_the_teacher_scores_the_completion_after_its_own_prompt(models, tok, setup):
    from dataclasses import replace

    rows_B, batch, (tokens, attn, comp, L) = setup
    teacher = LocalTeacher(load_model(str(models["teacher"])), len(tok))
    view = TeacherView(teacher, "default", tok)
    hand = replace(
        batch, tokens_BT=tokens, attention_mask_BT=attn, completion_mask_BT=comp, prompt_len=L,
        sampler_lp_BT=torch.zeros(tokens.shape),
    )  # fmt: skip
    want_lp, want_ids, want_lpk = teacher.score_topk(hand, 5)
    got_lp, got_ids, got_lpk = view.score_topk(batch, 5, rows_B)
    P, m = batch.prompt_len, batch.completion_mask_BT
    # the completion's columns: the student's from P on, the hand-made batch's from L on
    C = batch.tokens_BT.shape[1] - P
    torch.testing.assert_close(got_lp[:, P:][m[:, P:]], want_lp[:, L : L + C][m[:, P:]])
    assert torch.equal(got_lp[:, :P], torch.zeros_like(got_lp[:, :P]))
    moved = (want_lp, want_ids, want_lpk)
    moved = tuple(torch.cat([x[:, :0].new_zeros((x.shape[0], P, *x.shape[2:])), x[:, L:]], 1)
                  for x in moved)  # fmt: skip
    assert_same_topk(batch, (got_lp, got_ids, got_lpk), moved, 1e-6)
    own = LocalTeacher(load_model(str(models["teacher"])), len(tok)).score(batch)
    assert (own - got_lp)[m].abs().max() > 0.1  # its own prompt really changes its scores
    fn, lp = view.logits(batch, rows_B)  # the full-vocabulary losses read the same positions
    rows_N, cols_N = m.nonzero(as_tuple=True)
    logp = torch.log_softmax(fn(rows_N, cols_N), -1)
    picked = logp.gather(1, batch.tokens_BT[rows_N, cols_N][:, None])[:, 0]
    torch.testing.assert_close(picked, got_lp[rows_N, cols_N], atol=1e-5, rtol=0)
    torch.testing.assert_close(lp[m], got_lp[m], atol=1e-5, rtol=0)


def test_a_teacher_prompt_equal_to_the_prompt_changes_nothing(models, tok, setup):
    rows_B, batch, _ = setup
    teacher = LocalTeacher(load_model(str(models["teacher"])), len(tok))
    same = [type(p)(p.ids, {**p.row, "teacher_prompt": p.row["prompt"]}, p.where) for p in rows_B]
    view = TeacherView(teacher, "default", tok)
    assert torch.equal(view.score(batch, same), teacher.score(batch))


def test_a_teacher_given_the_answer_teaches_the_student_to_answer(tok, tmp_path):
    """Context distillation: the teacher is the student's own starting weights, given each
    prompt's secret in its prompt; the student, never shown it, learns to say it."""
    rng = random.Random(0)
    ws = ["".join(rng.choice("abcdefghij") for _ in range(rng.randint(3, 5))) for _ in range(400)]
    secret = {w: "".join(rng.choice("xyz") for _ in range(2)) for w in ws}
    base = tiny.tiny_model(tok, hidden=64, layers=2, seed=0)
    tiny.fit(base, tok, [(f"{secret[w]};{w}=", secret[w]) for w in ws], steps=200, lr=3e-3)
    folder = tiny.save(base, tok, tmp_path / "base")
    plain = [{"prompt": w + "=", "answer": secret[w]} for w in ws[:8]]
    given = [r | {"teacher_prompt": f"{r['answer']};{r['prompt']}"} for r in plain]
    accuracy = {}
    write_jsonl(tmp_path / "plain.jsonl", plain)
    write_jsonl(tmp_path / "given.jsonl", given)
    for name in ("given", "plain"):
        out = tmp_path / name
        flags = {
            "model.student": str(folder), "model.teacher": str(folder),
            "data.prompts": str(tmp_path / f"{name}.jsonl"),
            "eval.prompts": str(tmp_path / "plain.jsonl"), "run.out": str(out),
            "data.batch_prompts": 8, "sampling.group_size": 4, "sampling.max_new_tokens": 8,
            "run.steps": 150, "optim.lr": 3e-3, "eval.every": 150, "run.save_every": 1000,
        }  # fmt: skip
        distill(build_config(None, flags, []))
        evals = [json.loads(x) for x in (out / "metrics.jsonl").open()]
        accuracy[name] = [r["eval/accuracy"] for r in evals if "eval/accuracy" in r]
    # the start guesses a 2-letter secret from 9 at chance (0 or 1 of the 8 prompts, depending
    # on the machine's rounding); given the secret the teacher lifts it to 5 or more of 8
    assert accuracy["given"][0] <= 0.125 and accuracy["given"][-1] >= 0.5, accuracy
    # the same teacher without the secret teaches nothing: the student stays at chance
    assert accuracy["plain"][-1] <= 0.125, accuracy


def test_bad_teacher_context_is_one_line_naming_the_row(models, tok, tmp_path):
    def build(rows, *extra):
        write_jsonl(tmp_path / "p.jsonl", rows)
        flags = {
            "model.student": str(models["student"]), "model.teacher": str(models["teacher"]),
            "data.prompts": str(tmp_path / "p.jsonl"), "run.out": str(tmp_path / "r"),
        }  # fmt: skip
        return build_run(build_config(None, flags, list(extra)), DistContext())

    with pytest.raises(OpdError, match=r"p.jsonl:2: 'teacher_messages' must be a non-empty list"):
        build([{"prompt": "ab="}, {"prompt": "ab=", "teacher_messages": "hi"}])
    with pytest.raises(OpdError, match=r"p.jsonl:1: 'teacher_prompt' must be a string"):
        build([{"prompt": "ab=", "teacher_prompt": 3}])
    with pytest.raises(OpdError, match=r"p.jsonl:1: row has 'messages' but the tokenizer has no"):
        build([{"prompt": "ab=", "teacher_messages": [{"role": "user", "content": "ab"}]}])
    with pytest.raises(OpdError, match=r"p.jsonl:2: the teacher's prompt is 251 tokens"):
        build([{"prompt": "ab="}, {"prompt": "ab=", "teacher_prompt": "a" * 250}])
