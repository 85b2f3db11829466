"""Crash consistency: a run killed again and again, some kills landing while a checkpoint is
being written, ends with the weights of a run that was never killed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import torch

from .test_cli import distill_args, run_cli, weights


def _checkpoints(out):
    root = out / "checkpoints"
    return sorted(p.name for p in root.glob("step_*")) if root.is_dir() else []


def test_repeated_kills_during_checkpoint_writes_end_bit_identical(models, prompts_file, tmp_path):
    steps, args = 8, ["--save-every", "1", "--seed", "3"]
    straight = tmp_path / "straight"
    assert run_cli(distill_args(models, prompts_file, straight, steps, *args)).returncode == 0

    killed = tmp_path / "killed"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    kills = during_write = 0
    for i in range(4):
        before = _checkpoints(killed)
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "opd",
                *distill_args(models, prompts_file, killed, steps, *args),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=env,
        )
        deadline = time.time() + 120
        # Even tries: kill as soon as a checkpoint's temporary folder appears (in the middle of
        # its write); odd tries: once a new checkpoint is published, so that the run advances.
        while proc.poll() is None and time.time() < deadline:
            tmp = list((killed / "checkpoints").glob(".tmp-*")) if killed.exists() else []
            if (i % 2 == 0 and tmp) or _checkpoints(killed) != before:
                proc.send_signal(signal.SIGKILL)
                kills += 1
                during_write += bool(tmp)
                break
            time.sleep(0.001)
        proc.wait()
        if (killed / "final").exists():
            break
        # whatever the kill left, every published checkpoint is whole (loads) and the newest
        # is where the next run resumes
        for name in _checkpoints(killed):
            ckpt = killed / "checkpoints" / name
            assert (ckpt / "state.json").is_file() and (ckpt / "trainable.safetensors").is_file()
    assert kills >= 3, f"only {kills} kills landed"

    assert _checkpoints(killed), "no checkpoint survived the kills"
    r = run_cli(distill_args(models, prompts_file, killed, steps, *args))
    assert r.returncode == 0, r.stderr
    assert "resuming from" in r.stdout
    a, b = weights(straight / "final"), weights(killed / "final")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not list((killed / "checkpoints").glob(".tmp-*")), "a temporary folder was left"
    print(f"{kills} kills, {during_write} during a checkpoint write")
