"""`torchrun --nproc_per_node=2 -m opd ...` on CPU (gloo): a smoke run, and 2 ranks = 1 rank."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from opd.cli import main

from .conftest import write_jsonl
from .test_cli import distill_args


def torchrun(args, timeout=300):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [*cmd, "-m", "opd", *args], capture_output=True, text=True, timeout=timeout, env=env
    )


def test_two_process_torchrun(models, prompts_file, tmp_path):
    out = tmp_path / "ddp"
    r = torchrun(distill_args(models, prompts_file, out, 2, "--max-new-tokens", "6"))
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2]  # rank 0 alone writes
    # token counts are global: 4 prompts x 2 samples across both ranks, 1..6 tokens each
    assert all(8 <= row["tokens/completion"] <= 48 for row in rows)
    assert abs(rows[0]["ratio/mean"] - 1.0) < 1e-4
    assert r.stdout.count("final model written") == 1
    AutoModelForCausalLM.from_pretrained(out / "final")


# Rank 0 takes rows 0-1 (short completions), rank 1 rows 2-3 (long ones): with unequal per-rank
# token counts, a per-rank normalisation or a mean all-reduce gives a different gradient.
SFT_ROWS = [
    {"prompt": "ab=", "completion": "b"},
    {"prompt": "cdefg=", "completion": "dc"},
    {"prompt": "hij=", "completion": "jihgfedcba"},
    {"prompt": "abcdef=", "completion": "fedcbaghij"},
]


def sft_one_step(models, data, out):
    # AdamW's first step is ~lr * sign(grad), blind to the gradient's scale; with eps far above
    # |grad| it is ~(lr / eps) * grad, so the weights after the step check the gradient itself.
    return [
        "sft",
        "--student",
        str(models["student"]),
        "--prompts",
        str(data),
        "--out",
        str(out),
        "--steps",
        "1",
        "--batch-prompts",
        "4",
        "--max-new-tokens",
        "12",
        "--lr",
        "100",
        "--seed",
        "3",
        "data.shuffle=false",
        "optim.grad_clip=0",
        "optim.eps=1000",
    ]


def test_two_ranks_give_the_one_rank_gradient(models, tmp_path, capsys):
    data = write_jsonl(tmp_path / "sft.jsonl", SFT_ROWS)
    one, two = tmp_path / "one", tmp_path / "two"
    with pytest.raises(SystemExit) as exc:
        main(sft_one_step(models, data, one))
    assert exc.value.code == 0, capsys.readouterr().err
    r = torchrun(sft_one_step(models, data, two))
    assert r.returncode == 0, r.stderr[-3000:]

    m1, m2 = (json.loads((d / "metrics.jsonl").read_text().splitlines()[-1]) for d in (one, two))
    assert m1["step"] == m2["step"] == 1
    assert m1["tokens/completion"] == m2["tokens/completion"] == 2 + 3 + 11 + 11  # EOS included
    assert m2["loss"] == pytest.approx(m1["loss"], rel=1e-5)
    assert m2["optim/grad_norm"] == pytest.approx(m1["optim/grad_norm"], rel=1e-5)

    start = AutoModelForCausalLM.from_pretrained(models["student"]).state_dict()
    w1, w2 = (load_file(d / "final" / "model.safetensors") for d in (one, two))
    assert w1.keys() == w2.keys()
    moved = 0.0
    for name, a in w1.items():
        delta1, delta2 = a - start[name], w2[name] - start[name]
        moved = max(moved, delta1.abs().max().item())
        torch.testing.assert_close(
            delta2, delta1, rtol=1e-4, atol=1e-6, msg=lambda m, k=name: f"{k}: {m}"
        )
    assert moved > 1e-3  # the step did move the weights
