"""Distillation learns: a random student's KL to a teacher that always answers "xyz" falls fast."""

import json

import pytest

from opd.config import build_config
from opd.train import distill


def _learn(models, prompts_file, out, steps, **extra):
    cfg = build_config(
        None,
        {
            "model.student": str(models["student"]),
            "model.teacher": str(models["pattern"]),
            "data.prompts": str(prompts_file),
            "run.out": str(out),
            "run.steps": steps,
            "data.batch_prompts": 16,
            "sampling.group_size": 4,
            "sampling.max_new_tokens": 6,
            "optim.lr": 2e-2,
            "run.save_every": steps,
            **extra,
        },
        [],
    )
    distill(cfg)
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("seed", [0, 1])
def test_teacher_kl_drops_within_a_few_dozen_steps(models, prompts_file, tmp_path, seed):
    rows = _learn(models, prompts_file, tmp_path / "learn", 40, **{"run.seed": seed})
    kl = [r["teacher/kl"] for r in rows]
    first, last = sum(kl[:5]) / 5, sum(kl[-5:]) / 5
    assert first > 2.0, kl[:5]  # a random student is far from the teacher
    # measured over seeds 0-3 (two samplers' random streams): from ~4.5 to 0.02-0.2 on most
    # seeds, and to 0.9-2.0 on one seed in four, which settles in a worse mode at this high lr;
    # a student that does not learn stays at ~4.5
    assert last < 0.5 * first, (first, last)


@pytest.mark.parametrize("loss", ["topk", "full", "jsd"])
def test_vocabulary_losses_learn_too(models, prompts_file, tmp_path, loss):
    rows = _learn(
        models,
        prompts_file,
        tmp_path / loss,
        40,
        **{"objective.loss": loss, "objective.chunk_tokens": 50}
        | ({"objective.topk": 8} if loss == "topk" else {}),
    )
    kl = [r["teacher/kl"] for r in rows]
    first, last = sum(kl[:3]) / 3, sum(kl[-3:]) / 3
    assert first > 2.0, kl[:3]
    # measured over 40 steps: full 4.9 -> 1.5, topk 4.9 -> 1.7, jsd 4.9 -> 0.01 (the sampled-token
    # loss: -> 0.05); the exact reverse KL's gradient is small where the student has little mass
    assert last < 0.5 * first, (first, last)
    assert "ratio/mean" not in rows[0]  # no importance ratio outside the sampled-token loss
