"""Sampling on a vLLM engine against opd's in-process decoder, and what following the learner
costs: per step, the sampling, scoring and training times, the weight sync and its share of
the step, and the sampler/trainer log-prob gap, for sampling.backend=kv (in-process),
vllm (staleness 0) and vllm with one-step-off sampling (staleness 1), at each completion length.

    OPD_VLLM_VENV=~/.cache/opd/vllm-venv python benchmarks/engine_sampling.py \
        [--steps 12] [--lengths 64,256,1024] [--engine-cpus 1]

The student is a random Llama (hidden 256, 4 layers, 8 heads of 32: vLLM's CPU attention needs
head size >= 32), the teacher a random one twice as deep, over a character vocabulary of
--vocab tokens (a random model draws EOS about once in that many tokens, so rows run to the
cap: tokens/row shows it); 8 prompts x 4 samples per step, longer rows running fewer steps.
One engine serves both vLLM runs (started here with VLLM_SERVER_DEV_MODE=1, as opd starts its
own). --engine-cpus puts the engine on those cores and this process on the others (what
sampling.engine_cpus does), so sampling and training can overlap on one CPU machine. Medians
(min-max) over the steps after the first two; after each length, the one-step-off step time
against max(sample, teacher + train) of the synchronous vLLM run.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
from pathlib import Path

import torch

from opd import tiny
from opd.config import build_config
from opd.engine import leave_cores, parse_cpus, serve_vllm
from opd.samplers.vllm import ENGINE_ARGS, ENGINE_ENV
from opd.train import distill


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} ({min(values):.3f}-{max(values):.3f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--lengths", default="64", help="completion lengths, e.g. 64,256,1024")
    ap.add_argument("--vocab", type=int, default=2048, help="tokens in the character vocabulary")
    ap.add_argument("--out", default="/tmp/opd-engine")
    ap.add_argument("--engine-cpus", default="",
                    help="cores for the engine, e.g. 1; this process keeps the others")  # fmt: skip
    args = ap.parse_args()
    torch.set_num_threads(2)
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    extra = "".join(chr(0x4E00 + i) for i in range(max(0, args.vocab - len(tiny.CHARS) - 4)))
    tok = tiny.char_tokenizer(tiny.CHARS + extra)
    lengths = [int(x) for x in args.lengths.split(",")]
    context = max(lengths) + 64
    student = tiny.tiny_model(tok, hidden=256, layers=4, heads=8, kv_heads=8, seed=1,
                              max_positions=context)  # fmt: skip
    s_dir = tiny.save(student, tok, root / "student")
    teacher = tiny.tiny_model(tok, hidden=256, layers=8, heads=8, kv_heads=8, seed=2,
                              max_positions=context)  # fmt: skip
    t_dir = tiny.save(teacher, tok, root / "teacher")
    rng = random.Random(0)
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(
        json.dumps({"prompt": "".join(rng.choice("abcdefghij") for _ in range(12)) + "="}) + "\n"
        for _ in range(64)
    ))  # fmt: skip
    venv = (
        Path(os.environ["OPD_VLLM_VENV"]).expanduser() if os.environ.get("OPD_VLLM_VENV") else None
    )
    with serve_vllm(s_dir, venv, "student", max_model_len=max(lengths) + 32,
                    extra_args=ENGINE_ARGS, env_extra=ENGINE_ENV,
                    cpus=args.engine_cpus) as url:  # fmt: skip
        if args.engine_cpus:  # as sampling.engine_cpus does for the engine a run starts
            torch.set_num_threads(leave_cores(parse_cpus(args.engine_cpus, "--engine-cpus")))
        runs = {
            "kv (in-process)": {"sampling.backend": "kv"},
            "vllm, staleness 0": {"sampling.backend": "vllm", "sampling.urls": url},
            "vllm, staleness 1": {"sampling.backend": "vllm", "sampling.urls": url,
                                  "sampling.staleness": 1},
        }  # fmt: skip
        for length in lengths:
            steps = max(5, args.steps * 64 // max(length, 64))  # long rows: fewer steps
            print(f"\nstudent 256x4, teacher 256x8, {len(tok)} tokens, 8 prompts x 4 x up to "
                  f"{length} tokens, {steps} steps")  # fmt: skip
            print("| sampler | tokens/row | time/step s | time/sample s | time/teacher s | "
                  "time/train s | sync s (share of step) | sampler/trainer gap |")  # fmt: skip
            print("|---|---|---|---|---|---|---|---|")
            medians = {}
            for name, extra in runs.items():
                row, medians[name] = measure(
                    root / f"{length}", name, extra, s_dir, t_dir, prompts, steps, length
                )
                print(row, flush=True)
            sync, ahead = medians["vllm, staleness 0"], medians["vllm, staleness 1"]
            bound = max(sync["time/sample"], sync["time/teacher"] + sync["time/train"])
            print(f"\none-step-off: {ahead['time/step']:.3f} s a step = "
                  f"{ahead['time/step'] / bound:.2f} x max(sample, teacher + train) of the "
                  f"synchronous vLLM run ({bound:.3f} s); synchronous: {sync['time/step']:.3f} s "
                  f"= {sync['time/step'] / bound:.2f} x", flush=True)  # fmt: skip


def measure(root, name, extra, s_dir, t_dir, prompts, steps, length) -> str:
    out = root / name.split()[0].rstrip(",") / str(extra.get("sampling.staleness", 0))
    flags = {
        "model.student": str(s_dir), "model.teacher": str(t_dir),
        "data.prompts": str(prompts), "run.out": str(out), "run.steps": steps,
        "data.batch_prompts": 8, "sampling.group_size": 4, "sampling.max_new_tokens": length,
        "run.save_every": 10_000, "run.preflight": False, "optim.lr": 1e-4, **extra,
    }  # fmt: skip
    distill(build_config(None, flags, []), force=True)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").open()][2:]
    keys = ("time/step", "time/sample", "time/teacher", "time/train")
    col = {k: spread([r[k] for r in rows]) for k in keys}
    medians = {k: statistics.median(r[k] for r in rows) for k in keys}
    sync = "-"
    if "sampler/sync_s" in rows[0]:
        share = statistics.median(r["sampler/sync_s"] / r["time/step"] for r in rows)
        sync = f"{spread([r['sampler/sync_s'] for r in rows])} ({share:.0%})"
    gap = statistics.median(r.get("sampler/trainer_logprob_gap", 0.0) for r in rows)
    tokens = statistics.mean(r["tokens/mean_completion_len"] for r in rows)
    return (f"| {name} | {tokens:.0f} | {col['time/step']} | {col['time/sample']} | {col['time/teacher']} "
            f"| {col['time/train']} | {sync} | {gap:.2e} |"), medians  # fmt: skip


if __name__ == "__main__":
    main()
