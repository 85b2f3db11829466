"""opd distill vs TRL's DistillationTrainer on the same CPU work: step time, tokens/s, peak RSS.

Both get identical models, prompts, batch (64 completions: opd 16 prompts x 4, TRL the same 16
prompts each repeated 4 times, one completion per row), max new tokens, learning rate, seed,
precision and threads. TRL runs fully on-policy with beta=1 (reverse KL), gradient
checkpointing off. Every completion is exactly --max-new-tokens long: EOS is masked in both
samplers (a forward hook on TRL's student head, which only its generation calls; opd's draw,
fixed_length.py) and in neither loss, which makes the trained work identical: 64 x
max-new-tokens completion tokens per step.

Two model pairs (randomly initialised Llama, untied embeddings):
  small  ~20-token character vocabulary; student 0.4M (h128 L2), teacher 3.2M (h256 L4)
  large  32k byte-level BPE built here with `tokenizers` from this Python's standard library
         source; student h256 L2 (4x the small student's body), teacher h256 L4. The LM heads
         dominate, so full-vocabulary tensors decide the time and memory.

Each (framework, pair, precision) runs in its own process, so peak RSS is its own. A/B order
alternates over --rounds; each process runs --warmup steps, then --steps timed steps. Reported:
median step time with min-max over all timed steps, trained completion tokens/s, peak RSS, opd's
per-phase breakdown, and opd's step time as a multiple of the compute floor (floor.py): each opd
process divides its median step by the floor at the GEMM peak it measures right after its
timed steps (this machine's speed drifts by tens of percent from minute to minute); the table
gives the median over processes and their range.
opd runs twice: its default loss (sampled-token reverse KL, the blog's) and `--loss full` (the
full-vocabulary reverse KL that TRL's beta=1 computes).

    python benchmarks/vs_trl.py [--pairs small,large] [--dtypes float32,bfloat16] [--rounds 3]
Writes benchmarks/results/vs_trl.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CACHE = Path(os.environ.get("OPD_CACHE", Path.home() / ".cache" / "opd")) / "bench"
PAIRS = {
    "small": dict(
        student=dict(hidden=128, layers=2, heads=4, kv_heads=4, intermediate=352),
        teacher=dict(hidden=256, layers=4, heads=8, kv_heads=8, intermediate=704),
    ),
    "large": dict(
        student=dict(hidden=256, layers=2, heads=4, kv_heads=4, intermediate=704),
        teacher=dict(hidden=256, layers=4, heads=8, kv_heads=8, intermediate=704),
    ),
}
BATCH_PROMPTS, GROUP = 16, 4
LR = 1e-4


# ---------------------------------------------------------------------------------- models


def bpe_tokenizer(vocab_size: int = 32_000):
    """Byte-level BPE trained on the standard library's .py files (cached: ~1 min to build)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    path = CACHE / f"bpe{vocab_size}"
    if (path / "tokenizer.json").exists():
        return PreTrainedTokenizerFast.from_pretrained(str(path))
    files = sorted(str(p) for p in Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train(files, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    fast.save_pretrained(str(path))
    return fast


def prompts(pair: str, tokenizer, n: int = 256) -> list[str]:
    rng = random.Random(0)
    if pair == "small":
        return [f"{rng.randint(100, 999)}+{rng.randint(100, 999)}=" for _ in range(n)]
    lines = []
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:40]:
        lines += [ln.strip() for ln in path.read_text(errors="ignore").splitlines()]
    lines = [ln for ln in lines if 8 <= len(tokenizer(ln)["input_ids"]) <= 24]
    return rng.sample(lines, n)


def build_pair(pair: str, root: Path) -> None:
    from opd import tiny

    tok = tiny.char_tokenizer(chars="0123456789+=,;:.") if pair == "small" else bpe_tokenizer()
    for i, role in enumerate(("student", "teacher")):
        model = tiny.tiny_model(tok, seed=i, **PAIRS[pair][role])
        tiny.save(model, tok, root / role)
    rows = prompts(pair, tok)
    (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in rows))


def mask_eos(student, eos_id: int) -> None:
    """TRL's completions run to max_new_tokens: its sampler never sees EOS as possible (its
    loss reads the head's weight, so only generation sees this hook)."""

    def hook(module, inputs, logits):
        logits[..., eos_id] = float("-inf")
        return logits

    student.get_output_embeddings().register_forward_hook(hook)


# ---------------------------------------------------------------------------------- children


def build_opd(root: Path, dtype: str, threads: int, prefix: str, flags: dict):
    """An opd run (opd.build.Run) on the pair in `root`: both models in `dtype`, its prompts,
    this CPU, no preflight, no checkpoints; `flags` sets the batch, the loss and the rest."""
    import contextlib
    import io

    from opd.build import build_run
    from opd.config import build_config
    from opd.distributed import setup

    cfg = build_config(
        None,
        {
            "model.student": str(root / "student"),
            "model.teacher": str(root / "teacher"),
            "model.dtype": dtype,
            "model.teacher_dtype": dtype,
            "data.prompts": str(root / "prompts.jsonl"),
            "run.out": str(Path(tempfile.mkdtemp(prefix=prefix)) / "run"),
            "run.save_every": 10_000,
            "run.threads": threads,
            "run.device": "cpu",
            "run.preflight": False,
            **flags,
        },
        [],
    )
    ctx = setup("cpu", threads)
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        return build_run(cfg, ctx)


def child_opd(root: Path, args, loss: str) -> dict:
    import torch
    from fixed_length import never_sample_eos  # benchmarks/ is on sys.path
    from floor import gemm_peak, parts_floor_flops  # benchmarks/ is on sys.path

    from opd.train import train_step

    flags = {
        "data.batch_prompts": BATCH_PROMPTS,
        "sampling.group_size": GROUP,
        "sampling.max_new_tokens": args.max_new_tokens,
        "objective.loss": loss,
        "optim.lr": LR,
        "run.steps": args.warmup + args.steps,
    }
    parts = build_opd(root, args.dtype, args.threads, "opd-vs-trl-", flags)
    never_sample_eos(parts.tokenizer.eos_token_id)
    rows = [train_step(step, parts) for step in range(args.warmup + args.steps)][args.warmup :]
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # before the GEMMs below
    # the floor's denominator, measured in this process right after its timed steps, so that the
    # machine's drift from one process to the next moves both sides of the ratio
    peak = gemm_peak(getattr(torch, args.dtype), args.threads)
    tokens = {r["tokens/completion"] for r in rows}
    assert tokens == {BATCH_PROMPTS * GROUP * args.max_new_tokens}, tokens
    batch = parts.sampler.sample(parts.prompts[:BATCH_PROMPTS], GROUP, torch.Generator())
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
    n_steps = args.warmup + args.steps
    rows = []
    for step in range(n_steps):  # opd's order is shuffled; the work per step is what matters
        for p in texts[(step * BATCH_PROMPTS) % len(texts) :][:BATCH_PROMPTS]:
            rows += [{"prompt": p}] * GROUP
    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.t0)

    cfg = DistillationConfig(
        output_dir=tempfile.mkdtemp(prefix="trl-vs-opd-"),
        per_device_train_batch_size=BATCH_PROMPTS * GROUP,
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
        "tokens_per_step": BATCH_PROMPTS * GROUP * args.max_new_tokens,
    }


def child(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    root = CACHE / f"pair-{args.pair}"
    if args.child == "trl":
        out = child_trl(root, args)
    else:
        out = child_opd(root, args, "full" if args.child == "opd-full" else "sampled")
    out.setdefault("peak_rss_mb", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print("RESULT " + json.dumps(out))


# ---------------------------------------------------------------------------------- driver


def run_child(name: str, pair: str, dtype: str, args) -> dict:
    cmd = [
        sys.executable,
        str(Path(__file__)),
        "--child", name,
        "--pair", pair,
        "--dtype", dtype,
        "--steps", str(args.steps),
        "--warmup", str(args.warmup),
        "--threads", str(args.threads),
        "--max-new-tokens", str(args.max_new_tokens),
    ]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=f"{HERE}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.exit(f"{name} {pair} {dtype} failed:\n{proc.stderr[-3000:]}")
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
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--out", default=str(HERE / "results" / "vs_trl.json"))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--pair", help=argparse.SUPPRESS)
    ap.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)

    import torch

    frameworks = args.frameworks.split(",")
    results = []
    for pair in args.pairs.split(","):
        root = CACHE / f"pair-{pair}"
        if not (root / "prompts.jsonl").exists():
            build_pair(pair, root)
        for dtype in args.dtypes.split(","):
            runs: dict[str, list[dict]] = {f: [] for f in frameworks}
            for r in range(args.rounds):  # alternate the order: A B C, C B A, ...
                for name in frameworks if r % 2 == 0 else frameworks[::-1]:
                    runs[name].append(run_child(name, pair, dtype, args))
                    print(f"  {pair} {dtype} round {r + 1} {name}: "
                          f"{statistics.median(runs[name][-1]['step_s']):.3f} s/step", flush=True)  # fmt: skip
            row = {"pair": pair, "dtype": dtype}
            for name in frameworks:
                row[name] = summarise(runs[name])
            results.append(row)
    meta = {
        "threads": args.threads,
        "rows": BATCH_PROMPTS * GROUP,
        "max_new_tokens": args.max_new_tokens,
        "torch": torch.__version__,
        "trl": __import__("trl").__version__,
        "cpu_count": os.cpu_count(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")
    print(table(results))


def table(results: list[dict]) -> str:
    lines = [
        "| pair | precision | framework | step s (median, min-max) | tokens/s | vs TRL | "
        "peak RSS MB | x floor | x floor, prompts once | sample / teacher / train s |",
        "|---|---|---|---|---|---|---|---|---|---|",
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
                f"| {row['pair']} | {row['dtype']} | {name} | {r['median_step_s']:.3f} "
                f"({r['min_step_s']:.3f}-{r['max_step_s']:.3f}) | {r['tokens_per_s']:.0f} | "
                f"{ratio} | {r['peak_rss_mb']:.0f} | {' | '.join(floors)} | {phases} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
