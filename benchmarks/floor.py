"""The compute floor of one on-policy distillation step, and opd's step time as a multiple of it.

The floor is the model FLOPs the step cannot avoid, divided by the matrix-multiply peak of this
machine at the step's precision (measured here, same threads):

    sampling  forward of the student over prompt + completion tokens, LM head only where a next
              token is drawn (the last prompt position and every completion position but the last)
    teacher   forward of the teacher over prompt + completion, LM head at completion positions
    training  3 x the student's forward (forward + backward), LM head at completion positions

Per token, the transformer body costs 2 * N_body (N_body: every parameter but the input
embedding and the LM head) plus the causal attention term of `opd.flops`; the LM head costs
2 * d_model * V per position that needs logits. The input-embedding lookup is a gather, not
counted. Unlike `opd.flops` (a ledger convention that counts the head on every token), this is
a lower bound for a step that runs every row whole: the issue's floor ("the actual token
counts"), every row's prompt included.

The rows of one prompt share it, and opd's sampler, teacher and trainer run each distinct
prompt once (`teachers/shared_prompt.py`, `prompt_sharing.py`), so opd does less than that
floor counts. `prompts_once=True` gives the stricter floor of a step that also shares prompts:
each distinct prompt's tokens counted once per phase, every row's completion tokens as before.

Not counted: softmax/log-softmax over the vocabulary, norms, RoPE, activations, the optimizer
update. They are real time on a CPU (memory-bound), which is why a step cannot reach 1.0x.

On a CPU without bf16 matrix kernels (AVX2), torch's bf16 GEMM runs at a few GFLOP/s; the
floor then uses the float32 peak, which is how opd multiplies bf16 there (`fast/upcast.py`).

    python benchmarks/floor.py [--threads 2] [--dtype float32|bfloat16]   # GEMM peak only
    (benchmarks/vs_trl.py and benchmarks/step_time.py report the step's floor multiple)
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass

import torch

from opd.flops import ModelShape, forward_flops


@dataclass(frozen=True)
class FloorShape:
    body: ModelShape  # params = N_body (no input embedding, no LM head)
    head: int  # d_model * V: parameters of the LM head


def floor_shape(model) -> FloorShape:
    config = model.config
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    seen: dict[int, int] = {}
    for param in model.parameters():
        seen.setdefault(id(param), param.numel())
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    tied = embed is head
    body = sum(seen.values()) - embed.numel() - (0 if tied else head.numel())
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return FloorShape(ModelShape(body, config.num_hidden_layers, heads * head_dim), head.numel())


def step_floor_flops(
    student: FloorShape,
    teacher: FloorShape,
    prompt_lens_B: list[int],
    completion_lens_B: list[int],
    distinct_prompt_lens: list[int] | None = None,
) -> dict[str, int]:
    """Unavoidable FLOPs per phase of one step for these real (unpadded) lengths.

    distinct_prompt_lens: the lengths of the step's distinct prompts, to count each once (the
    floor of a step that shares prompts); None counts every row's prompt.
    """
    total_B = [p + c for p, c in zip(prompt_lens_B, completion_lens_B, strict=True)]
    zeros_B = [0] * len(total_B)
    positions = sum(completion_lens_B)  # logits needed at each completion position

    def forward(shape: FloorShape) -> int:
        if distinct_prompt_lens is None:
            return forward_flops(shape.body, zeros_B, total_B) + 2 * shape.head * positions
        prompts = forward_flops(shape.body, [0] * len(distinct_prompt_lens), distinct_prompt_lens)
        completions = forward_flops(shape.body, prompt_lens_B, completion_lens_B)
        return prompts + completions + 2 * shape.head * positions

    return {
        "sample": forward(student),
        "teacher": forward(teacher),
        "train": 3 * forward(student),
    }


def parts_floor_flops(parts, batch, prompts_once: bool = False) -> dict[str, int]:
    """step_floor_flops for an opd run's models (opd.build.Run) and one of its batches;
    prompts_once: each distinct prompt (batch.prompt_index_B) counted once."""
    from opd.models import inner_model

    teacher = next(iter(parts.teacher.teachers.values())).model
    prompt_B = batch.attention_mask_BT[:, : batch.prompt_len].sum(1)
    distinct = None
    if prompts_once:  # each prompt's length, once
        lens = dict(zip(batch.prompt_index_B.tolist(), prompt_B.tolist(), strict=True))
        distinct = list(lens.values())
    return step_floor_flops(
        floor_shape(inner_model(parts.student)),
        floor_shape(inner_model(teacher)),
        prompt_B.tolist(),
        batch.completion_mask_BT.sum(1).tolist(),
        distinct,
    )


def gemm_peak(dtype: torch.dtype, threads: int, sizes=(1024, 2048), repeats: int = 5) -> float:
    """Best median FLOP/s of square matrix multiplies on this machine (the floor's denominator).

    For bf16/fp16 on a CPU without kernels for them (`opd.fast.upcast.slow_half`), the
    float32 peak: the same products, the way opd's fast paths multiply them there (torch's own
    half GEMM runs at a few GFLOP/s on such a CPU: `python benchmarks/hot_paths.py --half`).
    """
    from opd.fast.upcast import slow_half

    if slow_half(dtype):
        dtype = torch.float32
    torch.set_num_threads(threads)
    best = 0.0
    for n in sizes:
        a = torch.randn(n, n).to(dtype)
        b = torch.randn(n, n).to(dtype)
        torch.mm(a, b)  # warm-up (first-call dispatch, page faults)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            torch.mm(a, b)
            times.append(time.perf_counter() - t0)
        best = max(best, 2 * n**3 / statistics.median(times))
    return best


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = ap.parse_args()
    peak = gemm_peak(getattr(torch, args.dtype), args.threads)
    print(f"GEMM peak {peak / 1e9:.0f} GFLOP/s ({args.dtype}, {args.threads} threads)")


if __name__ == "__main__":
    main()
