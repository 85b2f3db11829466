"""Metrics: one flat dict per step with namespaced keys, appended to metrics.jsonl, and progress.

A TTY gets a tqdm bar (step, teacher KL, tokens/s); anything else gets one plain line per step.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


class MetricsLogger:
    def __init__(self, path: Path | None, start_step: int, total_steps: int, enabled: bool = True):
        self.path = path
        self.enabled = enabled
        self.bar = None
        if not enabled:
            return
        if path is not None and path.exists():
            # Drop rows past the checkpoint we resume from: they will be produced again.
            kept = []
            for line in path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line torn by a kill mid-write
                if start_step > 0 and row.get("step", 0) <= start_step:  # from 0: all again
                    kept.append(line)
            tmp = path.with_name(path.name + ".tmp")  # replace atomically: a kill keeps history
            tmp.write_text("".join(line + "\n" for line in kept))
            os.replace(tmp, path)
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(
                total=total_steps,
                initial=start_step,
                desc="distill",
                unit="step",
                dynamic_ncols=True,
            )
        self.total_steps = total_steps

    def log(self, metrics: dict, progress: bool = True) -> None:
        if not self.enabled:
            return
        if self.path is not None:
            with self.path.open("a") as f:
                f.write(json.dumps(metrics) + "\n")
        if not progress:
            return
        name = "kl" if "teacher/kl" in metrics else "loss"
        shown = {name: metrics.get("teacher/kl", metrics.get("loss"))}
        if "eval/accuracy" in metrics:
            shown["acc"] = metrics["eval/accuracy"]
        if self.bar is not None:
            post = {k: f"{v:.4f}" for k, v in shown.items() if v is not None}
            post["tok/s"] = f"{metrics['throughput/tokens_per_s']:.0f}"
            self.bar.set_postfix(post, refresh=False)
            self.bar.update(1)
        else:
            label = "teacher/kl" if name == "kl" else "loss"
            acc = f" | eval/accuracy {shown['acc']:.3f}" if shown.get("acc") is not None else ""
            print(
                f"step {metrics['step']}/{self.total_steps} | {label} {shown[name]:.4f}{acc} | "
                f"{metrics['throughput/tokens_per_s']:.0f} tok/s | {metrics['time/step']:.2f} s",
                file=sys.stderr,
                flush=True,
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
