"""opd distill vs TRL's DistillationTrainer on the same CPU work: step time, tokens/s, peak RSS.

Both get identical models, prompts, batch (the pair's prompts x 4 completions: opd samples 4
per prompt, TRL gets each prompt repeated 4 times, one completion per row), max new tokens,
learning rate, seed, precision and threads. TRL runs fully on-policy with beta=1 (reverse KL),
gradient checkpointing off. Every completion is exactly --max-new-tokens long: EOS is masked in
both samplers (a forward hook on TRL's student head, which only its generation calls; opd's
draw, fixed_length.py) and in neither loss, which makes the trained work identical: rows x
max-new-tokens completion tokens per step.

The pairs (pairs.py): small and large (16 prompts, 64 rows: toy shapes, untied), real (a
SmolLM2-135M-shaped teacher and a 67M student, tied, 49k vocabulary; 4 prompts, 16 rows) and
qwen (two Qwen3-0.6B-shaped models, 152k embedding rows; 4 prompts, 16 rows).

Each (framework, pair, precision, length) runs in its own process, so peak RSS is its own. A/B order
alternates over --rounds; each process runs --warmup steps, then --steps timed steps. Reported:
median step time with min-max over all timed steps, trained completion tokens/s, peak RSS, opd's
per-phase breakdown, and opd's step time as a multiple of the compute floor (floor.py): each opd
process divides its median step by the floor at the GEMM peak it measures right after its
timed steps (this machine's speed drifts by tens of percent from minute to minute); the table
gives the median over processes and their range.
opd runs twice: its default loss (sampled-token reverse KL, the blog's) and `--loss full` (the
full-vocabulary reverse KL that TRL's beta=1 computes).

    python benchmarks/vs_trl.py [--pairs small,large,real] [--dtypes float32,bfloat16]
                                [--rounds 3] [--max-new-tokens 32[,256...]] [--out FILE]
Writes benchmarks/results/vs_trl.json (or --out) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pairs import GROUP, PAIRS, build_opd, build_pair, mask_eos  # benchmarks/, beside this file

HERE = Path(__file__).resolve().parent
LR = 1e-4


# ---------------------------------------------------------------------------------- children


def child_opd(root: Path, args, loss: str) -> dict:
    import torch
    from fixed_length import never_sample_eos  # benchmarks/ is on sys.path
    from floor import gemm_peak, parts_floor_flops  # benchmarks/ is on sys.path

    from opd.train import train_step

    flags = {
        "data.batch_prompts": PAIRS[args.pair]["batch_prompts"],
        "sampling.group_size": GROUP,
        "sampling.max_new_tokens": args.max_new_tokens,
        "objective.loss": loss,
        "optim.lr": LR,
        "run.steps": args.warmup + args.steps,
    }
    parts = build_opd(root, args.dtype, args.threads, "opd-vs-trl-", flags)
    n_prompts = PAIRS[args.pair]["batch_prompts"]
    never_sample_eos(parts.tokenizer.eos_token_id)
    rows = [train_step(step, parts) for step in range(args.warmup + args.steps)][args.warmup :]
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # before the GEMMs below
    # the floor's denominator, measured in this process right after its timed steps, so that the
    # machine's drift from one process to the next moves both sides of the ratio
    peak = gemm_peak(getattr(torch, args.dtype), args.threads)
    tokens = {r["tokens/completion"] for r in rows}
    assert tokens == {n_prompts * GROUP * args.max_new_tokens}, tokens
    batch = parts.sampler.sample(parts.prompts[:n_prompts], GROUP, torch.Generator())
    floor = parts_floor_flops(parts, batch)
    floor_once = parts_floor_flops(parts, batch, prompts_once=True)
    return {
        "step_s": [r["time/step"] for r in rows],
        "phases_s": {
            ph: statistics.median(r[f"time/{ph}"] for r in rows)
            for ph in ("sample", "teacher", "train")
        },
        "tokens_per_step": rows[0]["tokens/completion"],
        "teacher_kl_first": rows[0].get("teacher/kl"),
        "floor_flops": floor,
        "floor_flops_prompts_once": floor_once,
        "gemm_peak_flops": peak,
        "peak_rss_mb": rss_mb,
    }


def child_trl(root: Path, args) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from transformers.utils import logging as hf_logging
    from trl import DistillationConfig, DistillationTrainer

    hf_logging.set_verbosity_error()
    dtype = getattr(torch, args.dtype)
    tok = AutoTokenizer.from_pretrained(str(root / "student"))
    tok.padding_side = "left"
    student = AutoModelForCausalLM.from_pretrained(str(root / "student"), dtype=dtype)
    teacher = AutoModelForCausalLM.from_pretrained(str(root / "teacher"), dtype=dtype)
    mask_eos(student, tok.eos_token_id)
    texts = [json.loads(ln)["prompt"] for ln in (root / "prompts.jsonl").read_text().splitlines()]
    n_steps, n_prompts = args.warmup + args.steps, PAIRS[args.pair]["batch_prompts"]
    rows = []
    for step in range(n_steps):  # opd's order is shuffled; the work per step is what matters
        for p in texts[(step * n_prompts) % len(texts) :][:n_prompts]:
            rows += [{"prompt": p}] * GROUP
    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.t0)

    cfg = DistillationConfig(
        output_dir=tempfile.mkdtemp(prefix="trl-vs-opd-"),
        per_device_train_batch_size=n_prompts * GROUP,
        gradient_accumulation_steps=1,
        max_steps=n_steps,
        learning_rate=LR,
        lr_scheduler_type="constant",
        max_completion_length=args.max_new_tokens,
        temperature=1.0,
        beta=1.0,
        gradient_checkpointing=False,
        disable_dropout=True,
        shuffle_dataset=False,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        seed=0,
        use_cpu=True,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=cfg,
        train_dataset=Dataset.from_list(rows),
        processing_class=tok,
        callbacks=[Timer()],
    )
    torch.set_num_threads(args.threads)
    trainer.train()
    return {
        "step_s": times[args.warmup :],
        "tokens_per_step": n_prompts * GROUP * args.max_new_tokens,
    }


def child(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    root = build_pair(args.pair)
    if args.child == "trl":
        out = child_trl(root, args)
    else:
        out = child_opd(root, args, "full" if args.child == "opd-full" else "sampled")
    out.setdefault("peak_rss_mb", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print("RESULT " + json.dumps(out))


# ---------------------------------------------------------------------------------- driver


def run_child(name: str, pair: str, dtype: str, new: int, args) -> dict:
    cmd = [
        sys.executable,
        str(Path(__file__)),
        "--child", name,
        "--pair", pair,
        "--dtype", dtype,
        "--steps", str(args.steps),
        "--warmup", str(args.warmup),
        "--threads", str(args.threads),
        "--max-new-tokens", str(new),
    ]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=f"{HERE}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.exit(f"{name} {pair} {dtype} {new} tokens failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def summarise(runs: list[dict]) -> dict:
    steps = [s for r in runs for s in r["step_s"]]
    med = statistics.median(steps)
    out = {
        "median_step_s": med,
        "min_step_s": min(steps),
        "max_step_s": max(steps),
        "tokens_per_s": runs[0]["tokens_per_step"] / med,
        "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
    }
    if "phases_s" in runs[0]:
        out["phases_s"] = {
            ph: statistics.median(r["phases_s"][ph] for r in runs) for ph in runs[0]["phases_s"]
        }
        # each process's median step over the floor at the GEMM peak it measured; the median
        for suffix in ("", "_prompts_once"):
            out[f"floor_flops{suffix}"] = runs[0][f"floor_flops{suffix}"]
            floor_flops = sum(out[f"floor_flops{suffix}"].values())
            x_floor = [
                statistics.median(r["step_s"]) * r["gemm_peak_flops"] / floor_flops for r in runs
            ]
            out[f"x_floor{suffix}"] = statistics.median(x_floor)
            out[f"x_floor{suffix}_range"] = [min(x_floor), max(x_floor)]
        out["gemm_peak_flops"] = [r["gemm_peak_flops"] for r in runs]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--pairs", default="small,large")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--frameworks", default="opd,opd-full,trl")
    ap.add_argument("--rounds", type=int, default=3, help="A/B alternations per configuration")
    ap.add_argument("--steps", type=int, default=4, help="timed steps per process")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-new-tokens", default="32", help="completion lengths, comma-separated")
    ap.add_argument("--out", default=str(HERE / "results" / "vs_trl.json"))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--pair", help=argparse.SUPPRESS)
    ap.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        args.max_new_tokens = int(args.max_new_tokens)
        return child(args)

    import torch

    frameworks = args.frameworks.split(",")
    lengths = [int(n) for n in args.max_new_tokens.split(",")]
    results = []
    for pair in args.pairs.split(","):
        build_pair(pair)
        for dtype, new in itertools.product(args.dtypes.split(","), lengths):
            runs: dict[str, list[dict]] = {f: [] for f in frameworks}
            for r in range(args.rounds):  # alternate the order: A B C, C B A, ...
                for name in frameworks if r % 2 == 0 else frameworks[::-1]:
                    runs[name].append(run_child(name, pair, dtype, new, args))
                    print(f"  {pair} {dtype} {new} tokens round {r + 1} {name}: "
                          f"{statistics.median(runs[name][-1]['step_s']):.3f} s/step", flush=True)  # fmt: skip
            row = {"pair": pair, "dtype": dtype, "new_tokens": new}
            for name in frameworks:
                row[name] = summarise(runs[name])
            results.append(row)
    meta = {
        "threads": args.threads,
        "rows": {p: PAIRS[p]["batch_prompts"] * GROUP for p in args.pairs.split(",")},
        "torch": torch.__version__,
        "trl": __import__("trl").__version__,
        "cpu_count": os.cpu_count(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")
    print(table(results))


def table(results: list[dict]) -> str:
    lines = [
        "| pair | precision | new tokens | framework | step s (median, min-max) | tokens/s | vs TRL | "
        "peak RSS MB | x floor | x floor, prompts once | sample / teacher / train s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in results:
        trl = row.get("trl")
        for name in ("opd", "opd-full", "trl"):
            if name not in row:
                continue
            r = row[name]
            ratio = f"{trl['median_step_s'] / r['median_step_s']:.2f}x" if trl else "-"
            floors = ["-", "-"]
            if "x_floor" in r:
                for i, key in enumerate(("x_floor", "x_floor_prompts_once")):
                    lo, hi = r[f"{key}_range"]
                    floors[i] = f"{r[key]:.2f} ({lo:.2f}-{hi:.2f})"
            phases = (
                " / ".join(f"{v:.3f}" for v in r["phases_s"].values()) if "phases_s" in r else "-"
            )
            lines.append(
                f"| {row['pair']} | {row['dtype']} | {row['new_tokens']} | {name} | {r['median_step_s']:.3f} "
                f"({r['min_step_s']:.3f}-{r['max_step_s']:.3f}) | {r['tokens_per_s']:.0f} | "
                f"{ratio} | {r['peak_rss_mb']:.0f} | {' | '.join(floors)} | {phases} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
