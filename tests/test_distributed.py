"""`torchrun --nproc_per_node=2 -m opd distill` on CPU (gloo): a 2-process smoke run."""

import json
import os
import subprocess
import sys

from transformers import AutoModelForCausalLM

from .test_cli import distill_args


def test_two_process_torchrun(models, prompts_file, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += ["-m", "opd", *distill_args(models, prompts_file, out, 2, "--max-new-tokens", "6")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2]  # rank 0 alone writes
    # token counts are global: 4 prompts x 2 samples across both ranks, 1..6 tokens each
    assert all(8 <= row["tokens/completion"] <= 48 for row in rows)
    assert abs(rows[0]["ratio/mean"] - 1.0) < 1e-4
    assert r.stdout.count("final model written") == 1
    AutoModelForCausalLM.from_pretrained(out / "final")
