"""math's learning rates from a saved `opd experiment lr-sweep` (`opd experiment math --lr-from
DIR`): each method's `best_lr`, from a sweep made on the same teacher and SFT checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

from opd.errors import OpdError
from opd.experiments.demo_settings import task_name

FIELDS = {
    "opd": "opd_lr",
    "opd-full": "opd_full_lr",
    "opd-jsd": "opd_jsd_lr",
    "rl": "rl_lr",
    "sft": "sft_lr",
}


def swept_rates(sweep_dir: str, stages, sft_accuracy: float) -> dict[str, float]:
    """ExperimentSettings fields -> the sweep's pick; refused (one line) when the sweep is not an
    lr-sweep, lacks a method, or was made on other stages (another teacher or SFT start)."""
    path = Path(sweep_dir) / "results.json"
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise OpdError(f"--lr-from {sweep_dir}: cannot read {path} ({e})") from None
    if saved.get("experiment") != "lr-sweep":
        raise OpdError(f"--lr-from {sweep_dir}: {path} is not an lr-sweep's results")
    for key, value in (("sft_stop_at", stages.sft_stop_at),
                       ("teacher_stop_at", stages.teacher_stop_at or None),
                       ("sft_start_accuracy", sft_accuracy),
                       ("task", task_name(stages))):  # fmt: skip
        if saved.get(key) != value:
            raise OpdError(
                f"--lr-from {sweep_dir}: swept with {key}={saved.get(key)!r}, this run has "
                f"{value!r} (the rates must be picked on the same teacher and SFT checkpoint)"
            )
    methods = saved.get("methods", {})
    missing = sorted(set(FIELDS) - set(methods))
    if missing:
        raise OpdError(f"--lr-from {sweep_dir}: no sweep of {', '.join(missing)} in {path}")
    return {field: float(methods[name]["best_lr"]) for name, field in FIELDS.items()}
