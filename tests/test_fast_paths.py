"""`run.fast_paths=false` runs the plain Hugging Face forward everywhere (sampler, teacher,
trainer), and a run takes the same steps either way, to rounding."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from opd.config import build_config
from opd.errors import OpdError
from opd.fast.decode import KVCacheSampler
from opd.samplers import make_sampler
from opd.samplers.hf import HFSampler
from opd.train import distill


def run(models, prompts_file, out, fast: bool, **extra):
    flags = {
        "model.student": str(models["student"]),
        "model.teacher": str(models["teacher"]),
        "data.prompts": str(prompts_file),
        "run.out": str(out),
        "run.steps": 3,
        "data.batch_prompts": 4,
        "sampling.group_size": 3,
        "sampling.max_new_tokens": 6,
        "optim.lr": 1e-3,
        "run.preflight": False,
        "run.fast_paths": fast,
        **extra,
    }
    final = distill(build_config(None, flags, []))
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return rows, load_file(str(final / "model.safetensors"))


@pytest.mark.parametrize("loss", ["sampled", "full"])
def test_fast_and_plain_paths_take_the_same_steps(models, prompts_file, tmp_path, loss, capsys):
    fast_rows, fast_w = run(
        models, prompts_file, tmp_path / "fast", True, **{"objective.loss": loss}
    )
    plain_rows, plain_w = run(
        models, prompts_file, tmp_path / "plain", False, **{"objective.loss": loss}
    )
    err = capsys.readouterr().err  # each run says which sampler it chose, and why
    assert "opd: sampler: kv (opd's KV-cache decode loop)" in err
    assert "opd: sampler: hf (the model's own forward: run.fast_paths=false)" in err
    for a, b in zip(fast_rows, plain_rows, strict=True):
        assert a["tokens/completion"] == b["tokens/completion"]  # the same samples were drawn
        for key in ("loss", "teacher/kl", "optim/grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), key
    for name, w in fast_w.items():
        torch.testing.assert_close(w, plain_w[name], atol=1e-5, rtol=1e-4)


def test_the_switch_picks_the_plain_sampler_and_refuses_the_kv_backend(models, tok):
    from opd.models import load_model

    model = load_model(str(models["student"]), "float32", "cpu", "model.student")
    assert isinstance(make_sampler(model, tok, len(tok), 4), KVCacheSampler)
    assert isinstance(make_sampler(model, tok, len(tok), 4, fast=False), HFSampler)
    with pytest.raises(OpdError, match="sampling.backend=kv is a fast path"):
        make_sampler(model, tok, len(tok), 4, backend="kv", fast=False)


def test_phase_times_wait_for_the_device(monkeypatch):
    """On CUDA, time/* reads the clock once the queued kernels are done."""
    from opd.distributed import DistContext

    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(device))
    DistContext().clock()
    assert calls == []  # a CPU has nothing queued
    DistContext(device=torch.device("cuda", 0)).clock()
    assert calls == [torch.device("cuda", 0)]
