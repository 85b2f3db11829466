"""A real vLLM server (CPU build, its own venv from scripts/vllm_venv.sh) scores prompts exactly
as the in-process float32 forward pass does.

Select with `-m vllm`. Skipped (loudly) only when no installed venv is found at $OPD_VLLM_VENV
(default ~/.cache/opd/vllm-venv); with OPD_REQUIRE_VLLM=1 a missing venv fails instead.

The teacher has 2 heads of size 32: vLLM's CPU attention supports head sizes 32, 64, 80, ...
only. A head size of 16 (hidden 64 with 4 heads, the conftest teacher) serves and answers
/health, then dies on the first request with "Unsupported CPU attention configuration".
"""

from __future__ import annotations

import os

import pytest
import torch

from opd import tiny

from .conftest import assert_same_topk, words
from .vllm_server import SERVED_NAME, post_json, serve_vllm, venv_problem, vllm_venv

pytestmark = pytest.mark.vllm

ATOL = 1e-4
MAX_LOGPROBS = 20
SERVED = {}  # the served teacher's folder, for the in-process comparison runs


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """(tokenizer, in-process model loaded from the served folder, base URL of the server)."""
    problem = venv_problem()
    if problem:
        hint = "set OPD_VLLM_VENV to a venv made by scripts/vllm_venv.sh"
        if os.environ.get("OPD_REQUIRE_VLLM") == "1":
            pytest.fail(f"VLLM TESTS FAILED (OPD_REQUIRE_VLLM=1): {problem} [{hint}]")
        pytest.skip(f"VLLM TESTS SKIPPED: {problem} [{hint}]")
    from transformers import AutoModelForCausalLM

    tok = tiny.char_tokenizer()
    model = tiny.tiny_model(tok, hidden=64, layers=2, heads=2, kv_heads=2, seed=0)
    tiny.fit(model, tok, [(w + "=", w[::-1]) for w in words(200)], steps=30, lr=3e-3)
    path = tiny.save(model, tok, tmp_path_factory.mktemp("vllm") / "teacher")
    ref = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    SERVED["path"] = path
    log_path = path.parent / "vllm-serve.log"
    with serve_vllm(path, max_logprobs=MAX_LOGPROBS, log_path=log_path) as url:
        print(
            f"vllm: venv {vllm_venv()}, server up in {serve_vllm.last_startup_s:.1f} s, "
            f"log {log_path}"
        )
        yield tok, ref, url


def score(url: str, ids_N: list[list[int]], k: int) -> list[list]:
    """prompt_logprobs of each sequence, in the order sent."""
    status, body = post_json(
        url + "/completions",
        {"model": SERVED_NAME, "prompt": ids_N, "max_tokens": 1, "prompt_logprobs": k},
    )
    assert status == 200, body
    choices = body["choices"]
    assert [c["index"] for c in choices] == list(range(len(ids_N)))
    return [c["prompt_logprobs"] for c in choices]


@torch.no_grad()
def reference_logprobs(model, ids: list[int]) -> torch.Tensor:
    """[T-1, V] log-softmax of the logits at positions 0..T-2 (which score tokens 1..T-1)."""
    logits = model(torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)[:-1]


def sequences(tok) -> list[list[int]]:
    """Prompts and full prompt+answer+EOS rows of different lengths, BOS first (the tokenizer
    adds it; the server does not)."""
    ws = words(6, seed=7)
    out = [tok(w + "=")["input_ids"] for w in ws[:3]]
    out += [tok(w + "=" + w[::-1])["input_ids"] + [tok.eos_token_id] for w in ws[3:]]
    out.append([tok.bos_token_id, tok.convert_tokens_to_ids("a")])  # shortest: one scored token
    assert all(s[0] == tok.bos_token_id == 1 for s in out)
    assert len({len(s) for s in out}) > 3
    return out


def test_prompt_logprobs_match_in_process(teacher):
    tok, ref, url = teacher
    ids_N = sequences(tok)
    got_N = score(url, ids_N, k=0)
    for ids, got in zip(ids_N, got_N, strict=True):
        assert len(got) == len(ids)
        assert got[0] is None  # nothing scores the first token
        lp_TV = reference_logprobs(ref, ids)
        want = lp_TV.gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
        for t in range(1, len(ids)):
            entry = got[t]
            assert list(entry) == [str(ids[t])], entry  # k=0: the actual token only
            assert set(entry[str(ids[t])]) == {"logprob", "rank", "decoded_token"}
        have = torch.tensor([got[t][str(ids[t])]["logprob"] for t in range(1, len(ids))])
        torch.testing.assert_close(have, want, atol=ATOL, rtol=0)


def test_prompt_logprobs_top_k(teacher):
    tok, ref, url = teacher
    k = 5
    ids_N = sequences(tok)
    got_N = score(url, ids_N, k=k)
    for ids, got in zip(ids_N, got_N, strict=True):
        assert got[0] is None
        lp_TV = reference_logprobs(ref, ids)
        for t in range(1, len(ids)):
            entry = {int(i): v for i, v in got[t].items()}
            row = lp_TV[t - 1]
            actual = ids[t]
            assert actual in entry
            # the top-k, plus the actual token when it is not among them
            top = {i: v for i, v in entry.items() if v["rank"] <= k}
            assert len(top) == k and len(entry) == k + (actual not in top), entry
            assert sorted(v["rank"] for v in top.values()) == list(range(1, k + 1))
            want_vals, want_ids = row.topk(k)
            have_vals = torch.tensor(sorted((v["logprob"] for v in top.values()), reverse=True))
            torch.testing.assert_close(have_vals, want_vals, atol=ATOL, rtol=0)
            for i, v in entry.items():  # every returned id's value is that id's log-prob
                assert abs(v["logprob"] - row[i].item()) <= ATOL, (t, i, v)
            # rank: 1 + how many tokens have a higher log-prob
            assert entry[actual]["rank"] == 1 + int((row > row[actual] + ATOL).sum()), entry


def test_prompt_logprobs_above_max_is_400(teacher):
    tok, _, url = teacher
    status, body = post_json(
        url + "/completions",
        {
            "model": SERVED_NAME,
            "prompt": [tok("ab=")["input_ids"]],
            "max_tokens": 1,
            "prompt_logprobs": MAX_LOGPROBS + 1,
        },
    )
    assert status == 400, body
    # {"error": {"message": ..., "type": "BadRequestError", "param": "prompt_logprobs", "code": 400}}
    err = body["error"]
    assert err["code"] == 400 and err["param"] == "prompt_logprobs", body
    assert str(MAX_LOGPROBS) in err["message"], body


# -- opd's served backend against the real server ------------------------------------------


@pytest.fixture(scope="module")
def student_setup(teacher, tmp_path_factory):
    """A student with the teacher's tokenizer, a prompts file, and a left-padded batch."""
    from opd.data import load_prompts
    from opd.samplers import make_sampler

    from .conftest import write_jsonl

    tok, _, _ = teacher
    root = tmp_path_factory.mktemp("vllm-student")
    student = tiny.save(tiny.tiny_model(tok, hidden=32, layers=2, seed=1), tok, root / "student")
    prompts = write_jsonl(root / "prompts.jsonl", [{"prompt": w + "="} for w in words(32)])
    loaded, _ = load_prompts(str(prompts), tok)
    model = tiny.tiny_model(tok, hidden=32, layers=2, seed=1)
    batch = make_sampler(model, tok, len(tok), 12).sample(
        loaded[:8], 2, torch.Generator().manual_seed(0)
    )
    return student, prompts, batch


def test_served_teacher_backend_matches_in_process(teacher, student_setup):
    from opd.teachers.local import LocalTeacher
    from opd.teachers.served import ServedTeacher

    tok, ref, url = teacher
    _, _, batch = student_setup
    served = ServedTeacher(url, batch_rows=4, concurrency=4)
    local = LocalTeacher(ref, len(tok))
    torch.testing.assert_close(served.score(batch), local.score(batch), atol=ATOL, rtol=0)
    lp_s, ids_s, lpk_s = served.score_topk(batch, 5)
    lp_l, ids_l, lpk_l = local.score_topk(batch, 5)
    assert_same_topk(batch, (lp_s, ids_s, lpk_s), (lp_l, ids_l, lpk_l), ATOL)
    served.close()


def cli_first_step(student, teacher_spec, prompts, out, steps, *extra):
    """`opd distill` of a few steps: (the finished process, the first metrics row)."""
    import json

    from .test_cli import run_cli

    args = ["distill", "--student", str(student), "--teacher", teacher_spec]
    args += ["--prompts", str(prompts), "--out", str(out), "--steps", str(steps)]
    args += ["--batch-prompts", "4", "--group-size", "2", "--max-new-tokens", "8", *extra]
    r = run_cli(args)
    assert r.returncode == 0, r.stderr
    return r, json.loads((out / "metrics.jsonl").read_text().splitlines()[0])


def test_distill_through_vllm_matches_in_process_first_step(teacher, student_setup, tmp_path):

    _, _, url = teacher
    student, prompts, _ = student_setup

    def first_step(teacher_spec, out, *extra):
        return cli_first_step(student, teacher_spec, prompts, out, 2, *extra)

    r, served = first_step(url, tmp_path / "served")
    assert "teacher self-KL [default]  ok" in r.stdout  # preflight sampled through vLLM
    assert f"opd: teacher {url}: tokenizer checked: " in r.stderr  # /detokenize and /tokenize
    _, local = first_step(str(SERVED["path"]), tmp_path / "local")
    assert served["teacher/kl"] == pytest.approx(local["teacher/kl"], abs=1e-4)
    _, topk = first_step(url, tmp_path / "topk", "--loss", "topk", "objective.topk=5")
    assert topk["teacher/kl"] == pytest.approx(local["teacher/kl"], abs=1e-4)


def test_a_student_with_other_ids_of_the_same_size_is_refused_through_vllm(
    teacher, student_setup, tmp_path
):
    """vLLM's /detokenize and /tokenize (at the server's root) tell the tokenizers apart."""
    from opd.teachers.served import ServedTeacher
    from opd.teachers.tokenizer_check import check_served_tokenizer

    from .test_cli import run_cli
    from .test_served import swapped_tokenizer

    tok, _, url = teacher
    served = ServedTeacher(url)
    status, detail = check_served_tokenizer(served, tok)
    assert status == "ok", detail
    assert "ids decode alike and" in detail and "texts encode alike" in detail, detail
    other = swapped_tokenizer(tok, "a", "b", tmp_path / "tok")
    a = tok.convert_tokens_to_ids("a")
    differ = f"tokenizers differ: id {a} is 'b' for the student, 'a' for the teacher"
    assert check_served_tokenizer(served, other) == ("FAIL", differ)
    served.close()
    _, prompts, _ = student_setup
    student = tiny.save(tiny.tiny_model(other, hidden=32, layers=2, seed=1), other, tmp_path / "s")
    out = tmp_path / "run"
    r = run_cli(["distill", "--student", str(student), "--teacher", url, "--prompts",
                 str(prompts), "--out", str(out), "--steps", "1", "run.preflight=false"])  # fmt: skip
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines()[-1] == f"opd: error: teacher {url}: {differ}"
    assert "Traceback" not in r.stderr and not (out / "metrics.jsonl").exists()


def test_a_student_of_another_tokenizer_distils_through_vllm(teacher, tmp_path):
    """Across tokenizers through vLLM: a byte-pair student, the served character-level teacher
    named by model.teacher_tokenizer; vLLM scores the teacher's own ids of each completion's
    text, and the first step's KL is the in-process cross-tokenizer run's."""

    from .conftest import write_jsonl

    _, _, url = teacher
    bpe = tiny.bpe_tokenizer([w + "=" + w[::-1] for w in words(200)], vocab_size=96)
    student = tiny.save(tiny.tiny_model(bpe, hidden=32, layers=2, seed=1), bpe, tmp_path / "s")
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": w + "="} for w in words(32)])

    def first_step(teacher_spec, out, *extra):
        return cli_first_step(student, teacher_spec, prompts, out, 1, *extra)

    tok_dir = f"model.teacher_tokenizer={SERVED['path']}"
    r, served = first_step(url, tmp_path / "served", tok_dir)
    assert "scoring across tokenizers" in r.stderr and "tokenizer checked" in r.stderr
    _, local = first_step(str(SERVED["path"]), tmp_path / "local")
    assert served["teacher/kl"] == pytest.approx(local["teacher/kl"], abs=1e-4)


def test_whole_vocabulary_losses_through_vllm_are_refused_with_what_to_do(
    teacher, student_setup, tmp_path
):
    """vLLM returns at most each position's top-k: objective.loss=full needs opd serve-teacher
    or an in-process teacher, said in one line before anything is written."""
    from .test_cli import run_cli

    _, _, url = teacher
    student, prompts, _ = student_setup
    out = tmp_path / "run"
    r = run_cli(["distill", "--student", str(student), "--teacher", url, "--prompts",
                 str(prompts), "--out", str(out), "--steps", "1", "--loss", "full"])  # fmt: skip
    assert r.returncode == 2, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(f"opd: error: teacher {url}: objective.loss='full' needs"), last
    assert "HTTP 404" in last and "opd serve-teacher" in last, last
    assert "Traceback" not in r.stderr and not out.exists()
