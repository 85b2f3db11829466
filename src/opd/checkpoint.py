"""Atomic, resumable checkpoints in safetensors (no pickle anywhere).

checkpoints/step_000040/
    trainable.safetensors   the weights being trained (all of them, or the LoRA adapters)
    optimizer.safetensors   AdamW moments and step counts, keyed "<param index>.<name>"
    state.json              step, whether the run stopped early, FLOPs ledgers, optimizer
                            hyperparameters

No RNG state and no data position are saved: nothing needs them. Sampling draws from a fresh
generator per (seed, step, rank) and the prompts of a step are a function of (seed, step), so
resuming at step s replays exactly what an unbroken run does from s.

A checkpoint is written to a temporary folder and renamed into place, so a folder named
step_NNNNNN is always complete; a run killed at any moment (kill -9 included) resumes from the
newest one.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from opd.errors import OpdError

PREFIX = "step_"


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {
        n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad
    }


def _optimizer_tensors(optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    sd = optimizer.state_dict()
    tensors = {}
    for idx, state in sd["state"].items():
        for name, value in state.items():
            t = value if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"{idx}.{name}"] = t.detach().contiguous().cpu()
    return tensors, sd["param_groups"]


def save(ckpt_root: Path, step: int, model, optimizer, state: dict, keep: int) -> Path:
    final = ckpt_root / f"{PREFIX}{step:06d}"
    tmp = ckpt_root / f".tmp-{PREFIX}{step:06d}-{os.getpid()}"
    weights = trainable_state(model)
    opt_tensors, groups = _optimizer_tensors(optimizer)
    try:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_file(weights, str(tmp / "trainable.safetensors"))
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        (tmp / "state.json").write_text(
            json.dumps({**state, "step": step, "param_groups": groups}, indent=1)
        )
        for f in tmp.iterdir():  # make the bytes durable before the rename publishes them
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    except WRITE_ERRORS as e:  # a full disk, a read-only folder: the older checkpoints stay
        shutil.rmtree(tmp, ignore_errors=True)
        need = sum(t.numel() * t.element_size() for t in [*weights.values(), *opt_tensors.values()])
        raise write_failed(final, e, need, "checkpoint") from None
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(ckpt_root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


# What a failed write raises: OSError (ENOSPC, EROFS, EACCES), or safetensors' own error, which
# carries the OS's message ("No space left on device").
WRITE_ERRORS = (OSError, SafetensorError)


def write_failed(folder: Path, error: Exception, need: int, what: str) -> OpdError:
    """One line for a write that failed: the folder, the reason, the free space, the size."""
    reason = getattr(error, "strerror", None) or str(error).strip().splitlines()[0]
    reason = reason.split("I/O error: ")[-1]  # safetensors wraps the OS's message
    where = next((p for p in [folder, *folder.parents] if p.exists()), Path("."))
    free = shutil.disk_usage(where).free
    return OpdError(
        f"cannot write the {what} {folder} ({reason}): {gb(free)} free there, about {gb(need)} "
        "needed; free some space (nothing older was removed) and run the same command again"
    )


def gb(n: float) -> str:
    """A size in bytes, in GB, MB or kB."""
    if n >= 1e8:
        return f"{n / 1e9:.2f} GB"
    return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.0f} kB"


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    if not ckpt_root.is_dir():
        return []
    found = [
        p
        for p in ckpt_root.iterdir()
        if p.is_dir() and p.name.startswith(PREFIX) and (p / "state.json").is_file()
    ]
    return sorted(found, key=lambda p: p.name)


def step_of(path: Path) -> int:
    return int(path.name[len(PREFIX) :])


def clean_partial(ckpt_root: Path) -> None:
    """Remove temporary folders left by a run killed while writing."""
    if ckpt_root.is_dir():
        for p in ckpt_root.glob(f".tmp-{PREFIX}*"):
            shutil.rmtree(p, ignore_errors=True)


def load(path: Path, model, optimizer) -> dict:
    """Restore weights and optimizer in place; returns state.json."""
    try:
        state = json.loads((path / "state.json").read_text())
        weights = load_file(str(path / "trainable.safetensors"))
        opt_tensors = load_file(str(path / "optimizer.safetensors"))
    except (OSError, ValueError) as e:
        raise OpdError(f"checkpoint {path} is unreadable: {e}") from None
    params = dict(model.named_parameters())
    expected = {n for n, p in params.items() if p.requires_grad}
    if set(weights) != expected:
        raise OpdError(
            f"checkpoint {path} does not match the model being trained "
            f"({len(weights)} tensors saved, {len(expected)} trainable)"
        )
    with torch.no_grad():
        for name, tensor in weights.items():
            params[name].copy_(tensor)
    opt_state: dict[int, dict] = {}
    for key, tensor in opt_tensors.items():
        idx, name = key.split(".", 1)
        opt_state.setdefault(int(idx), {})[name] = tensor
    optimizer.load_state_dict({"state": opt_state, "param_groups": state["param_groups"]})
    return state
