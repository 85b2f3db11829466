"""Where an opd step's time goes on the shapes of a real small model, against a plain
transformers loop on the same batch.

The pair is pairs.py's "real" (random weights built here): a SmolLM2-135M-shaped teacher
(Llama, hidden 576, 30 layers, 9 heads and 3 KV heads of 64, intermediate 1536, tied
embeddings, 8192 positions, a 49152-token byte-level BPE) and an 11-layer student (67M).
Batch: 4 prompts of 37 tokens x 4 samples x --new-tokens new tokens, EOS never drawn
(fixed_length.py), so every row decodes the full length.

Rows printed (seconds, median and min-max over --rounds after one warm-up; A/B alternate):
  opd fast / opd plain   `train_step` with run.fast_paths on / off: time/sample, teacher, train
  hf loop                generate (static cache) + teacher forward + student forward/backward
                         + AdamW step, the loop a user writes with transformers alone
  generate dynamic       model.generate with its default cache (the sampling phase alone)
--profile prints torch.profiler's top operators of one opd fast step instead.

    python benchmarks/real_shapes.py [--new-tokens 48] [--rounds 3] [--threads 2]
                                     [--dtype float32|bfloat16] [--profile]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from fixed_length import never_sample_eos  # benchmarks/, beside this file
from pairs import GROUP, PAIRS, build_opd, build_pair

PROMPTS = PAIRS["real"]["batch_prompts"]


def opd_parts(root: Path, args, fast: bool):
    flags = {
        "data.batch_prompts": PROMPTS,
        "sampling.group_size": GROUP,
        "sampling.max_new_tokens": args.new_tokens,
        "optim.lr": 1e-5,
        "run.steps": 10_000,
        "run.fast_paths": fast,
    }
    return build_opd(root, args.dtype, args.threads, "opd-real-", flags)


def opd_step(parts, step: int) -> dict:
    from opd.train import train_step

    row = train_step(step, parts)
    return {ph: row[f"time/{ph}"] for ph in ("sample", "teacher", "train", "step")}


class HFLoop:
    """The batch with transformers alone: generate, teacher log-probs, student loss, AdamW."""

    def __init__(self, root: Path, dtype):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(str(root / "student"))
        self.tok.padding_side = "left"
        self.student = AutoModelForCausalLM.from_pretrained(str(root / "student"), dtype=dtype)
        self.teacher = AutoModelForCausalLM.from_pretrained(str(root / "teacher"), dtype=dtype)
        self.teacher.eval()
        self.opt = torch.optim.AdamW(self.student.parameters(), lr=1e-5)
        rows = [
            json.loads(ln)["prompt"]
            for ln in (root / "prompts.jsonl").read_text().split("\n")
            if ln
        ]
        self.prompts = rows
        self.eos = self.tok.eos_token_id

    def generate(self, step: int, new: int, cache: str | None) -> torch.Tensor:
        batch = self.prompts[step * PROMPTS % len(self.prompts) :][:PROMPTS]
        enc = self.tok(batch, return_tensors="pt", padding=True)
        with torch.no_grad():  # not inference_mode: the rows go on into a backward pass
            return self.student.generate(
                **enc, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                max_new_tokens=new, min_new_tokens=new, num_return_sequences=GROUP,
                cache_implementation=cache, pad_token_id=self.tok.pad_token_id,
            )  # fmt: skip

    def step(self, step: int, new: int) -> dict:
        t0 = time.perf_counter()
        seq = self.generate(step, new, "static")
        t1 = time.perf_counter()
        target, n = seq[:, 1:], seq.shape[1] - new - 1
        with torch.no_grad():
            lp_t = self.teacher(seq).logits[:, n:-1].float().log_softmax(-1)
            lp_t = lp_t.gather(-1, target[:, n:, None]).squeeze(-1)
        t2 = time.perf_counter()
        lp_s = self.student(seq).logits[:, n:-1].float().log_softmax(-1)
        lp_s = lp_s.gather(-1, target[:, n:, None]).squeeze(-1)
        adv = -(lp_s.detach() - lp_t)
        loss = -(torch.exp(lp_s - lp_s.detach()) * adv).mean()
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        return {"sample": t1 - t0, "teacher": t2 - t1, "train": t3 - t2, "step": t3 - t0}


def fmt(ts: list[float]) -> str:
    return f"{statistics.median(ts):7.2f} ({min(ts):.2f}-{max(ts):.2f})"


def profile(parts, step: int) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        times = opd_step(parts, step)
    print("one opd fast step:", {k: round(v, 2) for k, v in times.items()})
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--profile", action="store_true", help="profile one opd fast step instead")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    root = build_pair("real")
    fast = opd_parts(root, args, fast=True)
    never_sample_eos(fast.tokenizer.eos_token_id)
    if args.profile:
        opd_step(fast, 0)
        profile(fast, 1)
        return
    plain = opd_parts(root, args, fast=False)
    hf = HFLoop(root, getattr(torch, args.dtype))
    runs = {
        "opd fast": lambda k: opd_step(fast, k),
        "opd plain": lambda k: opd_step(plain, k),
        "hf loop": lambda k: hf.step(k, args.new_tokens),
        "generate dynamic": lambda k: _timed_generate(hf, k, args.new_tokens),
    }
    times: dict[str, list[dict]] = {name: [] for name in runs}
    for k in range(args.rounds + 1):
        for name, run in runs.items():
            times[name].append(run(k))
            print(f"round {k}, {name}:", {ph: round(s, 2) for ph, s in times[name][-1].items()},
                  flush=True)  # fmt: skip
    print(f"4 prompts x {GROUP} samples x {args.new_tokens} new tokens, {args.dtype}, "
          f"{args.threads} threads; seconds, median (min-max) of {args.rounds} rounds")  # fmt: skip
    from floor import gemm_peak, parts_floor_flops

    batch = fast.sampler.sample(fast.prompts[:PROMPTS], GROUP, torch.Generator())
    floor = parts_floor_flops(fast, batch)
    peak = gemm_peak(getattr(torch, args.dtype), args.threads)
    floor_s = {ph: flops / peak for ph, flops in floor.items()}
    floor_s["step"] = sum(floor_s.values())
    print(f"compute floor: {sum(floor.values()):.3g} FLOPs at {peak:.3g} FLOP/s (GEMM peak)")
    times["compute floor"] = [{}, floor_s]
    print("| run | sample | teacher | train | step |\n|---|---|---|---|---|")
    for name, rows in times.items():
        rows = rows[1:]
        cells = [fmt([r[ph] for r in rows]) if ph in rows[0] else "-"
                 for ph in ("sample", "teacher", "train", "step")]  # fmt: skip
        print(f"| {name} | " + " | ".join(cells) + " |")


def _timed_generate(hf: HFLoop, k: int, new: int) -> dict:
    t0 = time.perf_counter()
    hf.generate(k, new, None)
    return {"sample": time.perf_counter() - t0}


if __name__ == "__main__":
    main()
