"""A full disk: a checkpoint or final write that fails is one line naming the folder, the free
space and the size needed; its temporary folder is removed; the checkpoints before it stay, and
the same command resumes from them once there is room."""

from __future__ import annotations

import errno
import json
import shutil
from collections import namedtuple
from pathlib import Path

import pytest
import transformers
from safetensors import SafetensorError
from safetensors.torch import load_file

from opd import checkpoint
from opd.cli import main

from .test_cli import call, distill_args
from .test_nonfinite import assert_stopped_with


def full_disk_after(monkeypatch, n_ok: int, error: Exception):
    """safetensors writes fail, as on a full disk, after the first n_ok succeed."""
    save_file, calls = checkpoint.save_file, []

    def save(tensors, path, *args, **kwargs):
        calls.append(path)
        if len(calls) > n_ok:
            with open(path, "wb") as f:  # a torn file, as a write cut short leaves
                f.write(b"\0" * 10)
            raise error
        return save_file(tensors, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_file", save)


Usage = namedtuple("Usage", "free")
ENOSPC = OSError(errno.ENOSPC, "No space left on device")
RUST_ENOSPC = SafetensorError(
    "Error while serializing: I/O error: No space left on device (os error 28)"
)


@pytest.mark.parametrize("error", [ENOSPC, RUST_ENOSPC], ids=["OSError", "SafetensorError"])
def test_a_full_disk_at_a_checkpoint_keeps_the_one_before(
    models, prompts_file, tmp_path, capsys, monkeypatch, error
):
    out = tmp_path / "run"
    args = distill_args(models, prompts_file, out, 3, "--save-every", "1")
    full_disk_after(monkeypatch, 3, error)  # step 1's two files, then step 2's first
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(free=123_456_789))
    code, err = call(args, capsys)
    step_1 = out / "checkpoints" / "step_000001"
    need = sum(
        t.numel() * t.element_size()
        for name in ("trainable", "optimizer")
        for t in load_file(str(step_1 / f"{name}.safetensors")).values()
    )
    assert_stopped_with(
        code, err, f"cannot write the checkpoint {out / 'checkpoints' / 'step_000002'}",
        "(No space left on device", f"0.12 GB free there, about {checkpoint.gb(need)} needed",
    )  # fmt: skip
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts == ["step_000001"]  # no temporary folder left, step 1 intact
    monkeypatch.undo()
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 0
    assert "resuming from" in capsys.readouterr().out
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]


def test_a_full_disk_at_the_final_save(models, prompts_file, tmp_path, capsys, monkeypatch):
    def save_pretrained(self, path, *args, **kwargs):  # a full disk, part of the way through
        Path(path).mkdir(parents=True)
        (Path(path) / "model.safetensors").write_bytes(b"\0" * 10)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", save_pretrained)
    out = tmp_path / "run"
    code, err = call(distill_args(models, prompts_file, out, 1), capsys)
    assert_stopped_with(
        code, err, f"cannot write the final model {out / 'final'} (No space left on device)",
        "kB needed",
    )  # fmt: skip
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "config.json", "metrics.jsonl"]
    assert (out / "checkpoints" / "step_000001" / "state.json").is_file()
