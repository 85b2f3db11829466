"""The run's out folder: config.json, checkpoints, resume and the final model.

OUT/config.json        the run's settings (the API key left out); a rerun into OUT must match
OUT/metrics.jsonl      one row per step (metrics.py)
OUT/checkpoints/       step_NNNNNN folders (checkpoint.py), the newest kept
OUT/final/             the student in save_pretrained format (LoRA merged)
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from opd import checkpoint
from opd import config as config_mod
from opd.config import Config
from opd.errors import OpdError
from opd.guard import check_weights
from opd.models import inner_model

# Fields that may change between a run and its resumption without making it a different run.
RESUMABLE_CHANGES = {
    "objective.chunk_tokens",  # a memory knob: the same maths chunk by chunk
    "run.steps",
    "run.save_every",
    "run.keep_checkpoints",
    "run.threads",
    "run.device",
    "run.fast_paths",  # the same maths, to rounding
    "eval.prompts",
    "eval.every",
    "eval.max_new_tokens",
    "eval.extractor",
    "eval.limit",
    "model.teacher_api_key",  # never saved
    "remote.timeout",
    "remote.retries",
    "remote.backoff",
    "remote.concurrency",
    "remote.batch_rows",
    "run.preflight",
    "optim.max_skipped",  # how many non-finite steps in a row stop the run, not what a step does
    "data.unknown_chars",  # 'error' only refuses, before step 1, what 'unk' would encode
}


def check_out(out: Path, cfg: Config, force: bool) -> None:
    """Refuse an --out that holds a different run; with --force, clear that run's files."""
    cfg_path = out / "config.json"
    if out.exists() and not out.is_dir():
        raise OpdError(f"run.out={str(out)!r} exists and is not a folder")
    if force:
        for name in ("checkpoints", "final", "final.tmp"):
            shutil.rmtree(out / name, ignore_errors=True)
        (out / "metrics.jsonl").unlink(missing_ok=True)
        return
    if not cfg_path.exists():
        return
    try:
        old = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        old = None
    if not isinstance(old, dict):
        raise OpdError(
            f"{cfg_path} is not a run config; use another --out, or --force to replace it"
        )
    new = config_mod.to_dict(cfg)
    defaults = config_mod.to_dict(Config())  # a key an older opd did not write had its default
    free = RESUMABLE_CHANGES - ({"run.steps"} if cfg.optim.schedule == "cosine" else set())
    diff = [
        f"{s}.{k}"
        for s, table in new.items()
        for k, v in table.items()
        if f"{s}.{k}" not in free and (old.get(s) or {}).get(k, defaults[s][k]) != v
    ]
    if diff:
        raise OpdError(
            f"{out} holds a different run ({', '.join(diff)} differ); "
            "use another --out, or --force to replace it"
        )


def write_config(out: Path, cfg: Config) -> None:
    """config.json, replaced atomically (a kill mid-write never leaves a torn file)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / ".config.json.tmp"
        saved = config_mod.to_dict(cfg)
        saved["model"]["teacher_api_key"] = ""  # a secret stays out of the run folder
        tmp.write_text(json.dumps(saved, indent=2) + "\n")
        os.replace(tmp, out / "config.json")
    except OSError as e:
        raise OpdError(f"run.out={str(out)!r}: cannot write there ({e.strerror})") from None


def prepare(out: Path, cfg: Config, force: bool, ctx) -> list[Path]:
    """Check and claim the out folder (rank 0), then return the checkpoints found in it."""
    ckpt_root = out / "checkpoints"
    if ctx.is_main:
        check_out(out, cfg, force)
        checkpoint.clean_partial(ckpt_root)
    ctx.barrier()
    found = checkpoint.list_checkpoints(ckpt_root)
    if found and checkpoint.step_of(found[-1]) > cfg.run.steps:
        raise OpdError(
            f"{found[-1]} is past run.steps={cfg.run.steps}; raise --steps or use --force"
        )
    if ctx.is_main:
        write_config(out, cfg)
    ctx.barrier()
    return found


def resume(found: list[Path], run) -> tuple[int, bool]:
    """Load the newest complete checkpoint, if any; returns (step to start from, stopped early)."""
    if not found:
        return 0, False
    state = checkpoint.load(found[-1], run.student, run.optimizer)
    run.ledger.load_state_dict(state.get("flops", {}))
    run.eval_ledger.load_state_dict(state.get("eval_flops", {}))
    run.skips.load_state_dict(state.get("skips", {}))
    if run.ctx.is_main:
        print(f"resuming from {found[-1]} (step {state['step']})")
    return int(state["step"]), bool(state.get("stopped", False))


def save_checkpoint(out: Path, step: int, run, stopped: bool) -> None:
    """Every rank checks the weights agree and are fit to save; rank 0 writes step_NNNNNN."""
    run.ctx.check_in_sync(run.params, step)
    check_weights(run.params, run.weight_bound, f"step {step}", str(out))
    state = {
        "stopped": stopped,
        "flops": run.ledger.state_dict(),
        "eval_flops": run.eval_ledger.state_dict(),
        "skips": run.skips.state_dict(),
    }
    keep = run.cfg.run.keep_checkpoints
    on_main(run.ctx, checkpoint.save, out / "checkpoints", step, run.student, run.optimizer,
            state, keep)  # fmt: skip


def save_final(run, final_dir: Path) -> None:
    """Every rank checks the weights are fit to save; rank 0 writes the student in
    save_pretrained format (LoRA merged), atomically."""
    check_weights(run.params, run.weight_bound, "at the end", str(final_dir.parent))
    on_main(run.ctx, write_final, run.student, run.tokenizer, final_dir)
    if run.ctx.is_main:
        print(f"final model written to {final_dir}")


def on_main(ctx, write, *args) -> None:
    """write(*args) on rank 0; a failure (a full disk) stops every rank with its message (a
    rank left waiting at a barrier would hang)."""
    problem = ""
    if ctx.is_main:
        try:
            write(*args)
        except OpdError as e:
            problem = str(e)
    if ctx.max([float(bool(problem))])[0] > 0:
        raise OpdError(problem or "rank 0 could not write to run.out")


def write_final(student, tokenizer, final_dir: Path) -> None:
    tmp = final_dir.with_name(final_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model = student.merge_and_unload() if hasattr(student, "merge_and_unload") else student
    try:
        inner_model(model).save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
    except checkpoint.WRITE_ERRORS as e:
        shutil.rmtree(tmp, ignore_errors=True)
        need = sum(t.numel() * t.element_size() for t in inner_model(model).state_dict().values())
        raise checkpoint.write_failed(final_dir, e, need, "final model") from None
    shutil.rmtree(final_dir, ignore_errors=True)
    tmp.rename(final_dir)
