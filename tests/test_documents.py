"""Mid-training on documents: `{"text"}` rows in `opd sft` without a teacher are trained on every
token, cut to the context, mixed with a second file at a ratio, resumed exactly, with LoRA too."""

from __future__ import annotations

import json
import math
from collections import Counter

import pytest
import torch
from safetensors.torch import load_file

from opd import build, tiny
from opd.build import build_run
from opd.cli import main
from opd.config import build_config
from opd.data import load_prompts
from opd.distributed import DistContext
from opd.documents import mix_in, split_document

from .conftest import words, write_jsonl
from .test_cli import assert_one_line_error, call

CONTEXT = 48  # the student's context: long documents are cut into rows of at most this


@pytest.fixture(scope="module")
def student(tmp_path_factory, tok):
    model = tiny.tiny_model(tok, hidden=32, layers=2, seed=1, max_positions=CONTEXT)
    return tiny.save(model, tok, tmp_path_factory.mktemp("doc_student") / "student")


def documents(n: int) -> list[dict]:
    """Stretches of the cycle "abcdefghij ": each character fixes the next, so a model can
    learn them in a few steps, and far below what any context-free guess scores."""
    return [{"text": ("abcdefghij " * 4)[3 * i % 11 :][:30]} for i in range(n)]


def sft_args(student, data, out, steps, *extra):
    args = ["sft", "--student", str(student), "--prompts", str(data), "--out", str(out)]
    args += ["--steps", str(steps), "--batch-prompts", "4", "--max-new-tokens", "8"]
    return [*args, "--lr", "1e-2", *extra]


def run_ok(args, capsys):
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 0, capsys.readouterr().err


def built_rows(student, data, tmp_path, *overrides):
    """The training rows `build_run` makes of a file, with the student's real context."""
    flags = {"model.student": str(student), "data.prompts": str(data), "run.out": str(tmp_path)}
    flags |= {"objective.kind": "sft", "sampling.max_new_tokens": "8"}
    cfg = build_config(None, flags, list(overrides))
    return build_run(cfg, DistContext()).prompts


def nll(folder, prompts) -> float:
    """Mean NLL per completion token of the rows under the model saved in `folder`."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p.ids + p.completion_ids])
            lp_T = model(ids).logits[0, :-1].log_softmax(-1)
            targets = ids[0, 1:]
            picked_T = lp_T.gather(-1, targets[:, None])[:, 0][len(p.ids) - 1 :]
            total -= picked_T.sum().item()
            count += len(p.completion_ids)
    return total / count


def test_a_text_row_is_bos_then_every_token_and_eos(tmp_path, tok):
    text = "the cat sat on the mat."
    data = write_jsonl(
        tmp_path / "d.jsonl", [{"text": text}, {"prompt": "ab=", "completion": "ba"}]
    )
    doc, chat = load_prompts(str(data), tok, max_completion_tokens=8)[0]
    assert doc.ids == [tok.bos_token_id]
    assert doc.completion_ids == tok(text, add_special_tokens=False)["input_ids"] + [
        tok.eos_token_id
    ]
    assert chat.completion_ids == tok("ba", add_special_tokens=False)["input_ids"] + [
        tok.eos_token_id
    ]
    # a tokenizer that adds no BOS: the document's first token is the prompt, the rest trained
    plain = tiny.char_tokenizer(add_bos=False)
    (doc,) = load_prompts(str(data), plain, max_completion_tokens=8)[0][:1]
    ids = plain(text, add_special_tokens=False)["input_ids"]
    assert doc.ids == ids[:1] and doc.completion_ids == ids[1:] + [plain.eos_token_id]


def test_sft_on_documents_lowers_their_nll(student, tmp_path, tok, capsys):
    rows = documents(4) + [{"text": "abcdefghij " * 8}]  # 88 characters and EOS: 2 rows
    data, out = write_jsonl(tmp_path / "docs.jsonl", rows), tmp_path / "run"
    prompts = load_prompts(str(data), tok, max_completion_tokens=8, context=CONTEXT)[0]
    assert len(prompts) == 6
    run_ok(sft_args(student, data, out, 12, "--lr", "2e-2"), capsys)
    before, after = nll(student, prompts), nll(out / "final", prompts)
    # the best guess that ignores the context scores the targets' entropy (~2.45 nats)
    counts = Counter(t for p in prompts for t in p.completion_ids)
    n = sum(counts.values())
    unigram = -sum(c / n * math.log(c / n) for c in counts.values())
    assert before > 3.5 and after < 0.5 * unigram, (before, after, unigram)
    m = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert m[-1]["loss"] < 0.5 * m[0]["loss"]
    assert all(r["flops/train"] > 0 for r in m)  # the ledger counts the documents' rows


def test_a_long_document_is_cut_into_rows_of_the_context(student, tmp_path, tok):
    text = "".join(words(40))[:100]
    data = write_jsonl(tmp_path / "long.jsonl", [{"text": text}, {"text": "short one."}])
    rows = built_rows(student, data, tmp_path / "o")
    ids = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    n = math.ceil(len(ids) / (CONTEXT - 1))  # each row: BOS + up to CONTEXT - 1 targets
    parts, short = rows[:n], rows[n:]
    assert len(parts) == n == 3 and len(short) == 1
    assert sum((p.completion_ids for p in parts), []) == ids
    for i, p in enumerate(parts, 1):
        assert p.ids == [tok.bos_token_id] and len(p.ids) + len(p.completion_ids) <= CONTEXT
        assert (tok.eos_token_id in p.completion_ids) == (i == n)
        assert p.where.endswith(f"long.jsonl:1 (part {i}/{n})")
    assert short[0].where.endswith("long.jsonl:2")
    # without a BOS each row's prompt is the token before its completion: nothing is lost
    seq = list(range(10, 30))
    cut = split_document(seq[:-1], [], seq[-1], 8)
    assert [p for p, _ in cut] == [[10], [17], [24]]
    assert sum((c for _, c in cut), []) == seq[1:] and all(len(c) <= 7 for _, c in cut)


def test_mix_in_gives_the_ratio_within_one_row_and_keeps_the_order():
    for n_main in (1, 3, 10, 37, 100):
        main_rows = [("main", i) for i in range(n_main)]
        extra = [("mix", i) for i in range(7)]
        for ratio in (0.05, 0.1, 0.25, 0.5, 0.75, 0.9):
            out = mix_in(main_rows, extra, ratio, seed=3)
            n_mix = sum(r[0] == "mix" for r in out)
            assert abs(n_mix - ratio * len(out)) <= 1, (n_main, ratio, n_mix, len(out))
            assert [r for r in out if r[0] == "main"] == main_rows
            assert out == mix_in(main_rows, extra, ratio, seed=3)  # a function of its inputs
    # the mix rows are spread out, not appended: every window of 4 rows holds one at 0.25
    out = mix_in(list(range(30)), ["x"], 0.25, seed=0)
    assert all("x" in out[i : i + 4] for i in range(0, len(out) - 3, 4))


def test_data_mix_builds_the_row_list(student, tmp_path, capsys):
    docs = write_jsonl(tmp_path / "docs.jsonl", documents(12))
    chat = [{"prompt": w + "=", "completion": w[::-1]} for w in words(5)]
    mix = write_jsonl(tmp_path / "chat.jsonl", chat)
    rows = built_rows(student, docs, tmp_path / "o", f"data.mix={mix}", "data.mix_ratio=0.25")
    from_mix = [p for p in rows if "chat.jsonl" in p.where]
    assert len(rows) == 16 and len(from_mix) == 4
    assert {p.row["prompt"] for p in from_mix} <= {r["prompt"] for r in chat}
    assert "data.mix: 4 of the 16 rows come from" in capsys.readouterr().err


def test_resume_is_bit_identical(student, tmp_path, capsys):
    rows = documents(6) + [{"text": "abc def ghi " * 8}, {"prompt": "ab=", "completion": "ba"}]
    data = write_jsonl(tmp_path / "docs.jsonl", rows)
    mix = write_jsonl(tmp_path / "chat.jsonl", [{"prompt": "cd=", "completion": "dc"}])
    extra = ["--save-every", "1", "--seed", "7", f"data.mix={mix}", "data.mix_ratio=0.2"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    for out, steps in ((straight, 4), (resumed, 2), (resumed, 4)):
        run_ok(sft_args(student, data, out, steps, *extra), capsys)
    a, b = (load_file(str(o / "final" / "model.safetensors")) for o in (straight, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    m = [[json.loads(x)["loss"] for x in (o / "metrics.jsonl").read_text().splitlines()]
         for o in (straight, resumed)]  # fmt: skip
    assert m[0] == m[1] and len(m[0]) == 4


def test_lora_mid_training_changes_only_the_adapters(student, tmp_path, capsys):
    data, out = write_jsonl(tmp_path / "docs.jsonl", documents(4)), tmp_path / "lora"
    run_ok(sft_args(student, data, out, 2, "--lora-rank", "4"), capsys)
    ckpt = load_file(str(out / "checkpoints" / "step_000002" / "trainable.safetensors"))
    assert ckpt and all("lora_" in k for k in ckpt)
    base, merged = (load_file(str(f / "model.safetensors")) for f in (student, out / "final"))
    changed = [k for k in base if not torch.equal(base[k], merged[k])]
    assert changed and all(k.endswith("proj.weight") for k in changed)  # merged adapters only


@pytest.fixture()
def no_model_loads(monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("a model loaded before the bad input was refused")

    monkeypatch.setattr(build, "load_model", never)


@pytest.mark.parametrize(
    "line,extra,needles",
    [
        ('{"text": 3}', [], ["bad.jsonl:2", "'text' must be a string, got int"]),
        ('{"text": ["a"]}', [], ["bad.jsonl:2", "'text' must be a string, got list"]),
        ('{"text": ""}', [], ["bad.jsonl:2", "empty 'text'"]),
        ('{"text": "ab\\ud800"}', [], ["bad.jsonl:2", "'text' holds a lone surrogate"]),
        ('{"text": "ab", "completion": "c"}', [], ["bad.jsonl:2", "'completion' belongs"]),
        ('{"text": "ab"}', ["objective.kind=opd", "model.teacher=T"], ["bad.jsonl:2", "opd"]),
        ('{"text": "ab"}', ["objective.kind=rl"], ["bad.jsonl:2", "objective.kind=rl samples"]),
        ('{"text": "ab"}', ["--teacher", "T"], ["bad.jsonl:2", "with model.teacher"]),
        ('{"text": "ab"}', ["data.mix_ratio=1.5"], ["data.mix_ratio=1.5: must be 0 without"]),
        ('{"text": "ab"}', ["data.mix=m.jsonl"], ["data.mix_ratio=0.0: must be in (0, 1)"]),
        (
            '{"text": "ab"}',
            ["data.mix=m.jsonl", "data.mix_ratio=1.5"],
            ["data.mix_ratio=1.5: must be in (0, 1)"],
        ),
        (
            '{"text": "ab"}',
            ["data.mix=missing.jsonl", "data.mix_ratio=0.5"],
            ["data.mix: prompts file not found: missing.jsonl"],
        ),
        (
            '{"prompt": "ab="}',
            ["data.mix=m.jsonl", "data.mix_ratio=0.5", "--teacher", "T"],
            ["data.mix='m.jsonl': must be empty unless objective.kind=sft without model.teacher"],
        ),
    ],
)
def test_bad_documents_and_mixes_are_one_line_errors(
    student, tmp_path, capsys, no_model_loads, line, extra, needles
):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"prompt": "ab=", "completion": "ba"}\n' + line + "\n")
    code, err = call(sft_args(student, data, tmp_path / "out", 1, *extra), capsys)
    assert_one_line_error(code, err, *needles)
    assert not (tmp_path / "out").exists()
