"""Sampling on a real vLLM engine (CPU build) that follows the student's weights
(samplers/vllm.py, sampling.backend=vllm). Venv and skipping as in test_vllm.py."""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import pytest
import torch

from opd import tiny
from opd.data import load_prompts
from opd.errors import OpdError
from opd.models import load_model
from opd.samplers.vllm import ENGINE_ARGS, ENGINE_ENV, VLLMSampler

from .conftest import words, write_jsonl
from .vllm_server import serve_vllm, venv_problem, vllm_venv

pytestmark = pytest.mark.vllm

ATOL = 1e-4


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    """(student folder, tokenizer, prompts file, URL of an engine serving the student)."""
    problem = venv_problem()
    if problem:
        if os.environ.get("OPD_REQUIRE_VLLM") == "1":
            pytest.fail(f"VLLM TESTS FAILED (OPD_REQUIRE_VLLM=1): {problem}")
        pytest.skip(f"VLLM TESTS SKIPPED: {problem}")
    root = tmp_path_factory.mktemp("vllm-sampler")
    tok = tiny.char_tokenizer()
    model = tiny.tiny_model(tok, hidden=64, layers=2, heads=2, kv_heads=2, seed=3)
    tiny.fit(model, tok, [(w + "=", w[::-1]) for w in words(200)], steps=40, lr=3e-3)
    folder = tiny.save(model, tok, root / "student")
    prompts = write_jsonl(
        root / "p.jsonl", [{"prompt": w + "=", "answer": w[::-1]} for w in words(16)]
    )
    with serve_vllm(folder, log_path=root / "vllm.log", extra_args=ENGINE_ARGS,
                    env_extra=ENGINE_ENV) as url:  # fmt: skip
        yield folder, tok, prompts, url


def sampler_for(model, tok, url, temperature=1.0):
    return VLLMSampler(model, [url], "teacher", tok.pad_token_id, [tok.eos_token_id], len(tok),
                       12, temperature)  # fmt: skip


def hf_logprobs(model, batch, temperature=1.0):
    """The sampled tokens' log-probs under the model's tempered distribution, in process."""
    with torch.no_grad():
        logits = model(
            input_ids=batch.tokens_BT,
            attention_mask=batch.attention_mask_BT,
            position_ids=(batch.attention_mask_BT.cumsum(-1) - 1).clamp(min=0),
        ).logits[:, :-1]
        lp = torch.log_softmax(logits.float() / temperature, -1)
        got = lp.gather(-1, batch.tokens_BT[:, 1:, None])[..., 0]
    out = torch.zeros(batch.tokens_BT.shape)
    out[:, 1:] = got
    return out


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_engine_rollouts_carry_the_log_probs_of_the_distribution_sampled(engine, temperature):
    folder, tok, prompts_file, url = engine
    model = load_model(str(folder))
    prompts, _ = load_prompts(str(prompts_file), tok)
    sampler = sampler_for(model, tok, url, temperature)
    sampler.probe_ids = prompts[0].ids + [5, 6]
    sampler.synced = True  # the engine serves the folder the model came from
    batch = sampler.sample(prompts[:6], 4, torch.Generator().manual_seed(0))
    assert batch.tokens_BT.shape[0] == 24 and batch.prompt_index_B.tolist()[:5] == [0] * 4 + [1]
    m = batch.completion_mask_BT
    want = hf_logprobs(model, batch, temperature)
    torch.testing.assert_close(batch.sampler_lp_BT[m], want[m], atol=ATOL, rtol=0)
    ends = [row[mask].tolist()[-1] for row, mask in zip(batch.tokens_BT, m, strict=True)]
    lengths = m.sum(-1).tolist()
    assert all(e == tok.eos_token_id or n == 12 for e, n in zip(ends, lengths, strict=True))
    assert tok.eos_token_id in ends  # some rows end with EOS, kept in the completion
    again = sampler.sample(prompts[:6], 4, torch.Generator().manual_seed(0))
    assert torch.equal(again.tokens_BT, batch.tokens_BT)  # the step's seed fixes the draw
    # The same prompt twice in a step: two independent groups, not one seed's draws twice
    # (prompts batched into one request with one seed drew alike, their slips correlated).
    same = sampler.sample([prompts[0]] * 6, 4, torch.Generator().manual_seed(0))
    groups = [same.tokens_BT[g * 4 : (g + 1) * 4].tolist() for g in range(6)]
    assert all(groups[g] != groups[0] for g in range(1, 6))
    sampler.close()
    two = VLLMSampler(model, [url, url], "teacher", tok.pad_token_id, [tok.eos_token_id],
                      len(tok), 12, temperature)  # fmt: skip
    two.synced = True  # the prompts split over two engines (here the same one, twice)
    split = two.sample(prompts[:5], 2, torch.Generator().manual_seed(0))
    assert split.prompt_index_B.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    rows = split.tokens_BT[:, split.prompt_len - 5 : split.prompt_len]  # each row's prompt end
    for b, i in enumerate(split.prompt_index_B.tolist()):
        assert rows[b].tolist()[-len(prompts[i].ids[-5:]) :] == prompts[i].ids[-5:]
    m = split.completion_mask_BT
    want = hf_logprobs(model, split, temperature)
    torch.testing.assert_close(split.sampler_lp_BT[m], want[m], atol=ATOL, rtol=0)
    two.close()


def test_a_sync_brings_the_engine_to_new_weights_and_a_stale_one_is_caught(engine):
    folder, tok, prompts_file, url = engine
    model = load_model(str(folder))
    prompts, _ = load_prompts(str(prompts_file), tok)
    sampler = sampler_for(model, tok, url)
    sampler.probe_ids = prompts[0].ids + [5, 6, tok.eos_token_id]
    assert sampler.probe() < ATOL  # the engine serves the folder's weights
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    with pytest.raises(OpdError, match="does not serve the student's weights after the sync"):
        sampler.probe()  # stale: caught, never silent
    metrics = sampler.sync()
    assert metrics["sampler/probe_gap"] < ATOL and metrics["sampler/sync_s"] > 0
    batch = sampler.sample(prompts[:4], 2, torch.Generator().manual_seed(1))
    m = batch.completion_mask_BT
    torch.testing.assert_close(
        batch.sampler_lp_BT[m], hf_logprobs(model, batch)[m], atol=ATOL, rtol=0
    )
    sampler.model = load_model(str(folder))  # back to the folder's weights for the other tests
    sampler.sync()
    sampler.close()


def test_distill_samples_on_an_engine_it_starts_and_follows_the_student(
    engine, models, tmp_path, monkeypatch, capsys
):
    """sampling.backend=vllm with no URLs: opd starts vLLM from $OPD_VLLM_VENV, syncs after
    every step, and the trainer's log-probs match the engine's (ratio ~ 1) as the student moves."""
    from opd.config import build_config
    from opd.train import distill

    _, tok, prompts_file, _ = engine
    monkeypatch.setenv("OPD_VLLM_VENV", str(vllm_venv()))
    student = tiny.tiny_model(tok, hidden=64, layers=2, heads=2, kv_heads=2, seed=7)
    folder = tiny.save(student, tok, tmp_path / "student")  # random: far from the teacher
    out = tmp_path / "run"
    flags = {
        "model.student": str(folder), "model.teacher": str(models["teacher"]),
        "data.prompts": str(prompts_file), "run.out": str(out), "run.steps": 16,
        "data.batch_prompts": 8, "sampling.group_size": 4, "sampling.max_new_tokens": 10,
        "sampling.backend": "vllm", "optim.lr": 3e-3, "run.save_every": 100,
        "sampling.engine_args": "--max-num-seqs 24",
    }  # fmt: skip
    distill(build_config(None, flags, []))
    captured = capsys.readouterr()
    log = re.search(r"starting a vLLM engine for sampling \(log (\S+)\)", captured.err)
    assert "'max_num_seqs': 24" in Path(log.group(1)).read_text()  # sampling.engine_args
    said = captured.out  # preflight: the engine's own samples, scored by the trainer
    assert "sampler [vllm]             ok       mean |logp_engine - logp_trainer| = " in said, said
    rows = [json.loads(x) for x in (out / "metrics.jsonl").open()]
    assert len(rows) == 16
    assert abs(rows[0]["ratio/mean"] - 1) < 1e-3  # the first step samples the student itself
    for r in rows:
        assert r["sampler/trainer_logprob_gap"] < 1e-3, r  # the engine samples the student now
        assert r["sampler/probe_gap"] < 1e-3 and r["sampler/sync_s"] > 0
    kl = [r["teacher/kl"] for r in rows]
    assert sum(kl[-4:]) < sum(kl[:4]), kl


def test_a_lora_student_samples_on_an_engine_with_its_adapters_loaded_each_step(
    engine, models, tmp_path, monkeypatch
):
    """model.lora_rank > 0: opd starts the engine with --enable-lora and, after every step,
    loads the new adapters (vLLM's runtime LoRA loading) and unloads the previous ones."""
    from opd.config import build_config
    from opd.train import distill

    _, tok, prompts_file, _ = engine
    monkeypatch.setenv("OPD_VLLM_VENV", str(vllm_venv()))
    folder = tiny.save(tiny.tiny_model(tok, hidden=64, layers=2, heads=2, kv_heads=2, seed=7), tok,
                       tmp_path / "student")  # fmt: skip
    out = tmp_path / "run"
    flags = {
        "model.student": str(folder), "model.teacher": str(models["teacher"]),
        "data.prompts": str(prompts_file), "run.out": str(out), "run.steps": 6,
        "data.batch_prompts": 8, "sampling.group_size": 4, "sampling.max_new_tokens": 10,
        "sampling.backend": "vllm", "optim.lr": 1e-2, "model.lora_rank": 8,
        "run.save_every": 100, "run.preflight": False,
    }  # fmt: skip
    distill(build_config(None, flags, []))
    rows = [json.loads(x) for x in (out / "metrics.jsonl").open()]
    assert len(rows) == 6
    for r in rows:  # the adapters move the student away from the base; the engine follows
        assert r["sampler/trainer_logprob_gap"] < 1e-3 and r["sampler/probe_gap"] < 1e-3, r
    assert rows[-1]["ratio/max"] < 1.01


def test_sft_on_the_rows_own_completions_refuses_the_engine(engine, models, tmp_path):
    from opd.build import build_run
    from opd.config import build_config
    from opd.distributed import DistContext

    folder, _, _, url = engine
    rows = write_jsonl(tmp_path / "rows.jsonl", [{"prompt": "ab=", "completion": "ba"}] * 4)
    flags = {
        "model.student": str(folder), "data.prompts": str(rows), "run.out": str(tmp_path / "r"),
        "objective.kind": "sft", "sampling.backend": "vllm", "sampling.urls": url,
    }  # fmt: skip
    with pytest.raises(OpdError, match="SFT on the rows' own completions samples nothing"):
        build_run(build_config(None, flags, []), DistContext())


def test_sft_samples_the_teacher_on_an_engine_and_never_sends_it_weights(engine, tmp_path):
    """objective.kind=sft with sampling.backend=vllm: the engine serves the teacher, checked by
    the probe before the first sample; the student trains on its samples and the engine keeps
    the teacher's weights (nothing is synced). An engine serving other weights is caught."""
    from opd.config import build_config
    from opd.train import distill

    folder, tok, prompts_file, url = engine
    teacher = load_model(str(folder))
    check = sampler_for(teacher, tok, url)
    check.probe_ids = [tok.bos_token_id, 5, 6, 7, tok.eos_token_id]
    check.sync()  # the engine serves the folder's weights (other tests leave theirs)
    start = tiny.save(tiny.tiny_model(tok, hidden=64, layers=2, heads=2, kv_heads=2, seed=7), tok,
                      tmp_path / "start")  # fmt: skip
    flags = {
        "model.student": str(start), "model.teacher": str(folder), "objective.kind": "sft",
        "data.prompts": str(prompts_file), "run.out": str(tmp_path / "run"), "run.steps": 8,
        "data.batch_prompts": 8, "sampling.group_size": 4, "sampling.max_new_tokens": 10,
        "sampling.backend": "vllm", "sampling.urls": url, "sampling.staleness": 1,
        "optim.lr": 3e-3, "run.save_every": 100, "run.preflight": False,
    }  # fmt: skip
    distill(build_config(None, flags, []))
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").open()]
    assert len(rows) == 8
    assert not any("sampler/sync_s" in r or "sampler/probe_gap" in r for r in rows)  # no sync
    assert [r["sampler/staleness"] for r in rows] == [0] * 8  # sampled ahead, same teacher
    loss = [r["loss"] for r in rows]
    assert sum(loss[-2:]) < sum(loss[:2]), loss
    assert check.probe() < ATOL  # the student moved; the engine still serves the teacher
    with torch.no_grad():
        for p in check.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    check.sync()  # now the engine serves other weights than model.teacher's
    flags["run.out"] = str(tmp_path / "stale")
    with pytest.raises(OpdError, match="does not serve the teacher's weights"):
        distill(build_config(None, flags, []))
    check.model = load_model(str(folder))
    check.sync()
    check.close()


def engine_run(engine, models, out, steps, monkeypatch=None, **extra):
    """A distill run on the fixture's engine (sampling.urls); (metrics rows, final weights)."""
    from safetensors.torch import load_file

    from opd.config import build_config
    from opd.train import distill

    _, tok, prompts_file, url = engine
    folder = out.parent / "start"
    if not folder.exists():  # a random student, far from the teacher
        tiny.save(
            tiny.tiny_model(tok, hidden=64, layers=2, heads=2, kv_heads=2, seed=7), tok, folder
        )
    flags = {
        "model.student": str(folder), "model.teacher": str(models["teacher"]),
        "data.prompts": str(prompts_file), "run.out": str(out), "run.steps": steps,
        "data.batch_prompts": 8, "sampling.group_size": 4, "sampling.max_new_tokens": 10,
        "sampling.backend": "vllm", "sampling.urls": url, "optim.lr": 3e-3,
        "run.save_every": 4, "run.preflight": False, **extra,
    }  # fmt: skip
    distill(build_config(None, flags, []))
    rows = [json.loads(x) for x in (out / "metrics.jsonl").open()]
    weights = (
        load_file(str(out / "final" / "model.safetensors")) if (out / "final").exists() else None
    )
    return rows, weights


def test_the_prefetch_path_with_staleness_0_gives_the_synchronous_run(
    engine, models, tmp_path, monkeypatch
):
    through, w_through = engine_run(engine, models, tmp_path / "a", 6)
    assert [r["sampler/staleness"] for r in through] == [0] * 6
    from opd import build

    monkeypatch.setattr(build, "Prefetch", lambda sampler: sampler)  # plain calls
    plain, w_plain = engine_run(engine, models, tmp_path / "b", 6)
    assert "sampler/staleness" not in plain[0]
    assert [r["teacher/kl"] for r in through] == [r["teacher/kl"] for r in plain]
    assert all(torch.equal(w_through[k], w_plain[k]) for k in w_plain)


def test_one_step_off_samples_while_training_and_resumes_exactly(engine, models, tmp_path):
    rows, weights = engine_run(engine, models, tmp_path / "a", 8, **{"sampling.staleness": 1})
    # step 1 and the step after the checkpoint at 4 are sampled from the weights they train
    assert [r["sampler/staleness"] for r in rows] == [0, 1, 1, 1, 0, 1, 1, 1]
    stale = [r["sampler/trainer_logprob_gap"] for r in rows if r["sampler/staleness"]]
    fresh = [r["sampler/trainer_logprob_gap"] for r in rows if not r["sampler/staleness"]]
    assert max(fresh) < 1e-3 < min(stale)  # one update old: the ratio corrects a real gap
    # k_t of stale rows from the trained policy, corrected in the loss: no second forward
    assert not any("flops/student_rescoring" in r for r in rows)
    kl = [r["teacher/kl"] for r in rows]
    assert sum(kl[-3:]) < sum(kl[:3]), kl
    engine_run(engine, models, tmp_path / "b", 4, **{"sampling.staleness": 1})  # stops at 4
    resumed, resumed_weights = engine_run(engine, models, tmp_path / "b", 8,
                                          **{"sampling.staleness": 1})  # fmt: skip
    assert [r["teacher/kl"] for r in resumed] == kl
    assert all(torch.equal(weights[k], resumed_weights[k]) for k in weights)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_cuda_learner_trains_on_engine_rollouts(engine, models, tmp_path):
    """The learner on CUDA, the engine's rollouts (built on the CPU) moved to it; the probe
    scores the student where it lives. The first step's ratio is 1, every step is finite."""
    rows, weights = engine_run(engine, models, tmp_path / "run", 3, **{"run.device": "cuda"})
    assert len(rows) == 3 and weights is not None
    assert abs(rows[0]["ratio/mean"] - 1) < 1e-3
    for r in rows:
        assert r["sampler/probe_gap"] < 1e-3 and math.isfinite(r["loss"]), r


@pytest.mark.parametrize(
    "extra",
    [{"objective.loss": "topk", "objective.topk": 5}, {"objective.loss": "jsd"},
     {"objective.kind": "rl", "model.teacher": ""}],
    ids=["topk", "jsd", "rl"],
)  # fmt: skip
def test_other_objectives_train_on_engine_rollouts(engine, models, tmp_path, extra):
    rows, weights = engine_run(engine, models, tmp_path / "run", 2, **extra)
    assert len(rows) == 2 and weights is not None
    assert all(r["sampler/probe_gap"] < 1e-3 for r in rows)
    assert all(math.isfinite(r["loss"]) for r in rows)


def test_under_torchrun_each_rank_samples_on_an_engine_of_its_own(
    engine, models, tmp_path, monkeypatch
):
    """Two ranks (gloo), no sampling.urls: each rank starts its own engine and syncs it after
    every step; the sampler/trainer gap, summed over both ranks, stays at float noise (each
    engine follows the student), and the first step's ratio is 1."""
    from .test_distributed import torchrun

    folder, _, prompts_file, _ = engine
    monkeypatch.setenv("OPD_VLLM_VENV", str(vllm_venv()))
    out = tmp_path / "ddp"
    args = ["distill", "--student", str(folder), "--teacher", str(models["teacher"]),
            "--prompts", str(prompts_file), "--out", str(out), "--steps", "3",
            "--batch-prompts", "4", "--group-size", "2", "--max-new-tokens", "8",
            "sampling.backend=vllm", "optim.lr=3e-3", "run.preflight=false"]  # fmt: skip
    r = torchrun(args, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stderr.count("opd: starting a vLLM engine of rank") == 2, r.stderr[-3000:]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").open()]
    assert [row["step"] for row in rows] == [1, 2, 3]
    assert abs(rows[0]["ratio/mean"] - 1) < 1e-3
    for row in rows:
        assert row["sampler/trainer_logprob_gap"] < 1e-3, row
    assert rows[-1]["optim/grad_norm"] > 0


def test_torchrun_needs_an_engine_per_rank(engine, tmp_path):
    from opd.build import check_vllm
    from opd.config import build_config
    from opd.distributed import DistContext

    folder, _, prompts_file, url = engine
    base = {"model.student": str(folder), "model.teacher": str(folder),
            "data.prompts": str(prompts_file), "run.out": str(tmp_path / "r"),
            "sampling.backend": "vllm"}  # fmt: skip
    two = DistContext(rank=1, world_size=2)
    with pytest.raises(OpdError, match=r"sampling.urls: 1 engine\(s\) for 2 ranks"):
        check_vllm(build_config(None, {**base, "sampling.urls": url}, []), two)
    with pytest.raises(OpdError, match="places one engine: under torchrun"):
        check_vllm(build_config(None, {**base, "sampling.engine_cpus": "1"}, []), two)
    check_vllm(build_config(None, {**base, "sampling.urls": f"{url},{url}"}, []), two)
