"""Baselines in the same loop: RL on a 0/1 answer reward, reward + KL, and the FLOPs ledger."""

from __future__ import annotations

import json

import pytest
import torch

from opd.build import build_run as setup_run
from opd.config import build_config
from opd.data import step_indices
from opd.distributed import DistContext
from opd.errors import OpdError
from opd.flops import forward_flops, model_shape, sampling_flops, train_flops
from opd.logprobs import completion_logprobs
from opd.train import distill, sampling_generator, train_step

from .conftest import write_jsonl
from .test_cli import run_cli


def parts_for(models, prompts_file, tmp_path, student="teacher", **overrides):
    flags = {
        "model.student": str(models[student]),
        "data.prompts": str(prompts_file),
        "run.out": str(tmp_path / "unused"),
        "data.batch_prompts": 16,
        "sampling.group_size": 4,
        "sampling.max_new_tokens": 9,
        "optim.lr": 3e-3,
        **overrides,
    }
    return setup_run(build_config(None, flags, []), DistContext())


def test_rl_step_raises_rewarded_completions_over_the_rest(models, prompts_file, tmp_path):
    # The word-reversing model is the RL student: at temperature 1 some of its samples are right.
    # a small step, so the change is first order in the update direction
    p = parts_for(models, prompts_file, tmp_path, **{"objective.kind": "rl", "optim.lr": 1e-5})
    idx = step_indices(0, len(p.prompts), 16, 0, True, 0, 1)
    prompts = [p.prompts[i] for i in idx]
    batch = p.sampler.sample(prompts, 4, sampling_generator(0, 0, 0, torch.device("cpu")))
    rewards = p.score(batch, prompts).rewards_B
    assert 0 < rewards.mean() < 1, rewards  # a mix, so the centred advantages are not all 0

    def mean_lp():
        with torch.no_grad():
            lp = completion_logprobs(
                p.student, batch.tokens_BT, batch.attention_mask_BT, batch.prompt_len, p.vocab_size
            )
        return (lp * batch.completion_mask_BT).sum(-1) / batch.completion_mask_BT.sum(-1)

    before = mean_lp()
    metrics = train_step(0, p)  # samples the very same batch (same seed and step)
    delta = mean_lp() - before
    assert metrics["reward/mean"] == pytest.approx(rewards.mean().item())
    assert delta[rewards == 1].mean() > delta[rewards == 0].mean()
    assert "teacher/kl" not in metrics and metrics["ratio/mean"] == pytest.approx(1.0, abs=1e-4)


def test_rl_command_runs_without_a_teacher(models, prompts_file, tmp_path):
    out = tmp_path / "rl"
    args = ["rl", "--student", str(models["teacher"]), "--prompts", str(prompts_file)]
    args += ["--out", str(out), "--steps", "2", "--batch-prompts", "4", "--group-size", "2"]
    r = run_cli(args + ["--max-new-tokens", "9"])
    assert r.returncode == 0, r.stderr
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert all("reward/mean" in x and "flops/student_sampling" in x for x in rows)
    assert (out / "final").is_dir()


def test_reward_plus_kl_and_its_errors(models, prompts_file, tmp_path):
    p = parts_for(
        models,
        prompts_file,
        tmp_path,
        student="student",
        **{"model.teacher": str(models["teacher"]), "objective.reward_coef": 1.0},
    )
    metrics = train_step(0, p)
    assert {"reward/mean", "teacher/kl"} <= metrics.keys()
    with pytest.raises(
        OpdError,
        match="objective.reward_coef=1.0 has no effect with objective.kind=.opd., objective.loss=.full.",
    ):
        parts_for(
            models,
            prompts_file,
            tmp_path,
            **{
                "model.teacher": str(models["teacher"]),
                "objective.reward_coef": 1.0,
                "objective.loss": "full",
            },
        )
    no_answer = write_jsonl(tmp_path / "q.jsonl", [{"prompt": "ab="}, {"prompt": "cd="}])
    with pytest.raises(OpdError, match=r"q.jsonl:1: no 'answer' to reward"):
        parts_for(models, no_answer, tmp_path, **{"objective.kind": "rl"})


def test_ledger_counts_each_phase_from_the_steps_tokens(models, prompts_file, tmp_path):
    p = parts_for(
        models,
        prompts_file,
        tmp_path,
        student="student",
        **{"model.teacher": str(models["teacher"])},
    )
    idx = step_indices(0, len(p.prompts), 16, 0, True, 0, 1)
    batch = p.sampler.sample(
        [p.prompts[i] for i in idx], 4, sampling_generator(0, 0, 0, torch.device("cpu"))
    )
    prompt_B = batch.attention_mask_BT[:, : batch.prompt_len].sum(1)
    completion_B = batch.completion_mask_BT.sum(1)
    m = train_step(0, p)
    student, teacher = model_shape(p.student), model_shape(p.teacher.teachers["default"].model)
    assert m["flops/student_sampling"] == sampling_flops(student, prompt_B, completion_B)
    seq_B = prompt_B + completion_B
    assert m["flops/teacher_scoring"] == forward_flops(teacher, torch.zeros_like(seq_B), seq_B)
    assert m["flops/train"] == train_flops(student, seq_B)
    assert (
        m["flops/step"]
        == m["flops/student_sampling"] + m["flops/teacher_scoring"] + m["flops/train"]
    )
    assert m["flops/total"] == m["flops/step"]
    assert m["flops/train"] == pytest.approx(3 * sampling_flops(student, prompt_B, completion_B))


def test_ledger_totals_survive_resume(models, prompts_file, tmp_path):
    def run(out, steps):
        cfg = build_config(
            None,
            {
                "model.student": str(models["student"]),
                "model.teacher": str(models["teacher"]),
                "data.prompts": str(prompts_file),
                "run.out": str(out),
                "run.steps": steps,
                "run.save_every": 2,
                "data.batch_prompts": 4,
                "sampling.group_size": 2,
                "sampling.max_new_tokens": 6,
                "eval.prompts": str(prompts_file),
                "eval.every": 1,
                "eval.limit": 4,
                "run.preflight": False,
            },
            [],
        )
        distill(cfg)
        return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]

    whole = run(tmp_path / "whole", 4)
    run(tmp_path / "split", 2)
    split = run(tmp_path / "split", 4)  # resumes at step 2
    for key in ("flops/total", "flops/eval_total"):
        assert [r.get(key) for r in split] == [r.get(key) for r in whole]
    assert whole[-1]["flops/total"] == sum(r.get("flops/step", 0) for r in whole)
    # evaluation (step 0 and after each step) has its own running total, outside flops/total
    assert len(whole) == 5 and all(r["flops/eval"] > 0 for r in whole)
    assert whole[-1]["flops/eval_total"] == pytest.approx(sum(r["flops/eval"] for r in whole))
    assert whole[0]["flops/eval_total"] == whole[0]["flops/eval"] and "flops/total" not in whole[0]


def test_ledger_resumes_from_a_checkpoint_without_one():
    from opd.flops import Ledger

    ledger = Ledger()
    ledger.load_state_dict({})  # written by an opd without the ledger, or at a step-0 stop
    ledger.add("train", 6.0)
    assert ledger.step_metrics()["flops/total"] == 6.0
