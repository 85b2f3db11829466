"""A teacher with another tokenizer: the completion's text re-encoded, spans aligned by
character offsets, the KL summed per span (teachers/align.py, teachers/view.py)."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from opd import tiny
from opd.build import build_run
from opd.config import build_config
from opd.data import load_prompts
from opd.distributed import DistContext
from opd.errors import OpdError
from opd.models import load_model, load_tokenizer
from opd.samplers import make_sampler
from opd.teachers.align import (
    align,
    alignment_summary,
    char_ends,
    common_prefix,
    prefix_ends,
    spread,
)
from opd.teachers.local import LocalTeacher
from opd.teachers.view import TeacherView
from opd.train import distill

from .conftest import words

TEXTS = [w + "=" + w[::-1] for w in words(300)]


@pytest.fixture(scope="module")
def bpe():
    return tiny.bpe_tokenizer(TEXTS, vocab_size=96)


@pytest.fixture(scope="module")
def bpe_teacher(bpe, tmp_path_factory):
    """A teacher that reverses words, in byte-pair tokens (merges such as 'c=c' span the '=')."""
    model = tiny.tiny_model(bpe, hidden=64, layers=2, seed=0)
    tiny.fit(model, bpe, [(w + "=", w[::-1]) for w in words(300)], steps=150, lr=3e-3)
    return tiny.save(model, bpe, tmp_path_factory.mktemp("bpe") / "teacher")


@pytest.fixture(scope="module")
def batch(models, prompts_file, tok):
    """Student samples of 6 prompts x 2, left-padded, some ending in EOS, some cut."""
    student = load_model(str(models["student"]))
    prompts, _ = load_prompts(str(prompts_file), tok)
    sampler = make_sampler(student, tok, len(tok), 10)
    return prompts[:6], sampler.sample(prompts[:6], 2, torch.Generator().manual_seed(0))


def rows_of(prompts, batch):
    return [prompts[i] for i in batch.prompt_index_B.tolist()]


# -- the alignment, by hand and generated ----------------------------------------------------


def test_spans_are_the_coarsest_shared_boundaries():
    # text "abcd": student a|b|c|d, teacher ab|cd -> spans ab, cd
    assert align([1, 2, 3, 4], [2, 4], 4, 4) == ([0, 0, 1, 1], [0, 1], 2)
    # teacher a|bcd: one shared boundary inside -> a, bcd
    assert align([1, 2, 3, 4], [1, 4], 4, 4) == ([0, 1, 1, 1], [0, 1], 2)
    # a student token that ends inside a character (None) joins the next token's span
    assert align([None, 2], [2], 2, 2) == ([0, 0], [0], 1)
    # past where the teacher's decoding stops matching (agree=2), the rest is one span
    assert align([1, 2, 3, 4], [2, 3, 4], 4, 2) == ([0, 0, 1, 1], [0, 1, 1], 2)


def test_spread_gives_each_token_its_spans_mean_kl_and_is_exact_per_span():
    s = torch.tensor([-1.0, -2.0, -0.5])
    t = torch.tensor([-2.5, -1.0])
    got = spread(s, t, [0, 0, 1], [0, 1])
    k = s - got
    assert k[:2].tolist() == pytest.approx([(-3.0 + 2.5) / 2] * 2)  # span 0: k = -0.5 over 2
    assert k[2].item() == pytest.approx(-0.5 + 1.0)
    t3 = torch.tensor([-0.3, -0.2, -0.1])
    assert torch.equal(spread(s, t3, [0, 1, 2], [0, 1, 2]), t3)  # 1:1 spans: the same values


@settings(max_examples=60, deadline=None)
@given(text=st.text(alphabet="abcdefghij=", min_size=1, max_size=40), seed=st.integers(0, 99))
def test_the_per_token_values_sum_to_the_sequence_log_ratio(bpe, text, seed):
    """Whatever the two tokenizations, sum_t (s_t - spread_t) = sum s - sum t exactly."""
    char = tiny.char_tokenizer()
    s_ids = char(text, add_special_tokens=False)["input_ids"]
    t_ids = bpe(text, add_special_tokens=False)["input_ids"]
    s_span, t_span, n = align(
        char_ends(char, s_ids, text), char_ends(bpe, t_ids, text), len(text), len(text)
    )
    assert sorted(set(s_span)) == list(range(n)) and set(t_span) <= set(range(n))
    assert char_ends(bpe, t_ids, text) == prefix_ends(bpe, t_ids, text)  # the quick way agrees
    g = torch.Generator().manual_seed(seed)
    s = -torch.rand(len(s_ids), generator=g) * 5
    t = -torch.rand(len(t_ids), generator=g) * 5
    k = s - spread(s, t, s_span, t_span)
    assert k.double().sum().item() == pytest.approx((s.sum() - t.sum()).item(), abs=1e-4)


def test_a_token_ending_inside_a_utf8_character_is_no_boundary():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())  # one token per byte, no merges
    raw = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    byte_tok = PreTrainedTokenizerFast(tokenizer_object=raw)
    text = "aé"
    ids = byte_tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == 3  # a, and the two bytes of é
    assert char_ends(byte_tok, ids, text) == [1, None, 2]  # pieces do not join: every prefix
    char = tiny.char_tokenizer(chars=tiny.CHARS + "é")
    c_ids = char(text, add_special_tokens=False)["input_ids"]
    assert align(char_ends(char, c_ids, text), [1, None, 2], 2, 2) == ([0, 1], [0, 1, 1], 2)


def test_common_prefix():
    assert common_prefix("abc", "abd") == 2 and common_prefix("ab", "abc") == 2


# -- the teacher through the cross-tokenizer path --------------------------------------------


def test_the_same_tokenizer_through_the_cross_path_gives_the_same_numbers(models, tok, batch):
    prompts, b = batch
    model = load_model(str(models["teacher"]))
    direct = LocalTeacher(model, len(tok)).score(b)
    copy = load_tokenizer(str(models["teacher"]))  # another object, the same tokenizer
    view = TeacherView(LocalTeacher(model, len(tok)), "default", tok, tokenizer=copy)
    crossed = view.score(b, rows_of(prompts, b))
    assert b.completion_mask_BT.any(-1).all()
    assert torch.equal(crossed, direct)  # decoded, re-encoded, 1:1 spans: bit for bit


def permuted(tok, model, folder):
    """The model and its tokenizer with every id moved (specials too): another vocabulary,
    the same distribution over text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = tok.get_vocab()
    order = sorted(vocab, key=lambda t: (hash(t) % 997, t))  # a fixed shuffle
    new_vocab = {t: i for i, t in enumerate(order)}
    raw = Tokenizer(models.WordLevel(vocab=new_vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    raw.decoder = decoders.Fuse()
    raw.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", new_vocab["<s>"])]
    )
    new_tok = PreTrainedTokenizerFast(
        tokenizer_object=raw, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        unk_token="<unk>",
    )  # fmt: skip
    perm = torch.tensor([vocab[t] for t in order])  # new id -> old id
    with torch.no_grad():
        model.get_input_embeddings().weight.copy_(model.get_input_embeddings().weight[perm])
        model.get_output_embeddings().weight.copy_(model.get_output_embeddings().weight[perm])
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(model.config, key, getattr(new_tok, key))
    return tiny.save(model, new_tok, folder), new_tok


def test_a_teacher_that_is_the_student_in_another_vocabulary_gives_kl_zero(
    models, tok, batch, tmp_path
):
    prompts, b = batch
    folder, new_tok = permuted(tok, load_model(str(models["student"])), tmp_path / "perm")
    assert new_tok.get_vocab() != tok.get_vocab() and new_tok.eos_token_id != tok.eos_token_id
    view = TeacherView(LocalTeacher(load_model(str(folder)), len(new_tok)), "d", tok, new_tok)
    k = (b.sampler_lp_BT - view.score(b, rows_of(prompts, b)))[b.completion_mask_BT]
    assert k.abs().max().item() < 1e-5  # KL ~ 0 per token, EOS (another id) included


def flags(student, teacher, prompts, out, **extra):
    return {
        "model.student": str(student),
        "model.teacher": str(teacher),
        "data.prompts": str(prompts),
        "run.out": str(out),
        "data.batch_prompts": 8,
        "sampling.group_size": 2,
        "sampling.max_new_tokens": 8,
        **extra,
    }


def kl_curve(out):
    return [json.loads(line)["teacher/kl"] for line in (out / "metrics.jsonl").open()]


def test_a_student_distils_from_a_teacher_with_another_tokenizer(
    models, bpe_teacher, prompts_file, tmp_path, capsys
):
    out = tmp_path / "run"
    cfg = build_config(
        None, flags(models["student"], bpe_teacher, prompts_file, out), ["run.steps=30",
        "optim.lr=3e-3", "run.save_every=100"],
    )  # fmt: skip
    distill(cfg)
    err = capsys.readouterr().err
    assert "its tokenizer is not the student's (student has 55 tokens, teacher has 96)" in err
    kl = kl_curve(out)
    first, last = sum(kl[:5]) / 5, sum(kl[-5:]) / 5
    assert last < 0.8 * first, kl  # measured: 4.9 -> 3.2 on this pair


def test_losses_that_compare_vocabularies_are_refused_across_tokenizers(
    models, bpe_teacher, prompts_file, tmp_path
):
    for extra in (["objective.loss=topk"], ["objective.loss=full"], ["objective.kind=sft"]):
        cfg = build_config(
            None, flags(models["student"], bpe_teacher, prompts_file, tmp_path / "r"), extra
        )
        with pytest.raises(OpdError, match="another tokenizer than the student's") as e:
            build_run(cfg, DistContext())
        assert "objective.loss=sampled" in str(e.value)
    cfg = build_config(
        None, flags(models["student"], bpe_teacher, prompts_file, tmp_path / "r"),
        [f"model.teacher_tokenizer={bpe_teacher}"],
    )  # fmt: skip
    with pytest.raises(OpdError, match="teacher 'default' is not a served teacher"):
        build_run(cfg, DistContext())


def test_opd_check_reports_how_the_tokenizations_align(models, bpe, bpe_teacher, prompts_file):
    from opd.preflight import check_command

    assert check_command(str(models["student"]), str(bpe_teacher), str(prompts_file), []) == 0
    summary = alignment_summary(tiny.char_tokenizer(), bpe, ["abc=cba"])
    # char: a b c = c b a; bpe: a b c=c b a -> "c=c" is one span of 3 student tokens
    assert summary.startswith("7 student and 5 teacher tokens in 5 shared spans"), summary


def test_a_served_teacher_with_another_tokenizer_scores_as_in_process(
    models, bpe, bpe_teacher, tmp_path
):
    """`opd serve-teacher` of the byte-pair teacher, its tokenizer given as
    model.teacher_tokenizer: the first step's KL is the in-process cross-tokenizer run's, with
    a teacher-only prompt on some rows."""
    from opd.serve import TeacherScorer, create_app

    from .test_served import serving

    rows = [{"prompt": w + "=", "answer": w[::-1]} for w in words(16)]
    for row in rows[::2]:
        row["teacher_prompt"] = f"{row['answer']};{row['prompt']}"
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def first_step(teacher, out, *extra):
        f = flags(models["student"], teacher, prompts, out, **{"run.steps": 1})
        distill(build_config(None, f, ["run.preflight=false", *extra]))
        return json.loads((out / "metrics.jsonl").read_text().splitlines()[0])

    local = first_step(bpe_teacher, tmp_path / "local")
    scorer = TeacherScorer(load_model(str(bpe_teacher)), bpe)
    with serving(create_app(scorer, max_logprobs=5, max_rows=64)) as url:
        served = first_step(url, tmp_path / "served", f"model.teacher_tokenizer={bpe_teacher}")
        cfg = build_config(None, flags(models["student"], url, prompts, tmp_path / "x"), [])
        with pytest.raises(OpdError, match="tokenizers differ"):  # without it: refused
            build_run(cfg, DistContext())
    assert served["teacher/kl"] == pytest.approx(local["teacher/kl"], abs=1e-5)
    assert served["loss"] == pytest.approx(local["loss"], abs=1e-5)


def test_teachers_of_different_tokenizers_share_a_run(
    models, tok, bpe_teacher, prompts_file, tmp_path
):
    """model.teachers mixes a byte-pair teacher with the student-tokenizer one: each row is
    scored by its own teacher, through its own path, and both KLs are logged."""
    rows = [json.loads(x) for x in prompts_file.read_text().splitlines()]
    for i, row in enumerate(rows):
        if i % 2:
            row["teacher"] = "bpe"
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    f = flags(models["student"], models["teacher"], prompts, tmp_path / "run")
    f["model.teachers"] = f"bpe={bpe_teacher}"
    run = build_run(build_config(None, f, []), DistContext())
    step = run.prompts[:8]
    b = run.sampler.sample(step, 2, torch.Generator().manual_seed(0))
    names_B = run.teacher.names(b, [p.row.get("teacher", "default") for p in step])
    rows_B = [step[i] for i in b.prompt_index_B.tolist()]
    routed = run.teacher.score(b, names_B, rows_B)
    for name, rows_R in run.teacher.groups(names_B).items():
        teacher = run.teacher.teachers[name]
        sub, mine = b.select(rows_R), [rows_B[i] for i in rows_R.tolist()]
        alone = teacher.score(sub, mine) if name == "bpe" else teacher.score(sub)
        assert torch.equal(routed[rows_R], alone), name
    assert isinstance(run.teacher.teachers["bpe"], TeacherView)
    assert not isinstance(run.teacher.teachers["default"], TeacherView)
    run.score.close()
    distill(build_config(None, {**f, "run.steps": 2}, []))
    last = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["teacher/kl/bpe"] > 0 and last["teacher/kl/default"] > 0


def test_a_messages_row_is_rendered_by_the_teachers_own_chat_template():
    from opd.data import Prompt

    student_tok, teacher_tok = tiny.char_tokenizer(), tiny.bpe_tokenizer(TEXTS, vocab_size=96)
    student_tok.chat_template = "{% for m in messages %}{{ m['content'] }}={% endfor %}"
    teacher_tok.chat_template = "{% for m in messages %}q:{{ m['content'] }};{% endfor %}"
    row = {"messages": [{"role": "user", "content": "abc"}]}
    prompt = Prompt(ids=student_tok("abc=", add_special_tokens=False)["input_ids"], row=row,
                    where="p.jsonl:1")  # fmt: skip
    view = TeacherView(None, "default", student_tok, teacher_tok)
    assert view.prompt_ids(prompt) == teacher_tok("q:abc;", add_special_tokens=False)["input_ids"]
    given = Prompt(prompt.ids, row | {"teacher_messages": [{"role": "user", "content": "cba"}]},
                   "p.jsonl:2")  # fmt: skip
    assert view.prompt_ids(given) == teacher_tok("q:cba;", add_special_tokens=False)["input_ids"]
