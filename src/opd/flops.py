"""A FLOPs ledger: model FLOPs per phase of a step, from token counts, as pure functions.

The formula (Kaplan et al. 2020, "Scaling Laws for Neural Language Models", Table 1, with the
attention term written out as in Hoffmann et al. 2022, "Chinchilla", Appendix F):

    N       = every parameter of the model: embeddings, every layer, final norm, LM head
              (tied input/output embeddings counted once)
    L       = number of transformer layers
    d_attn  = num_attention_heads * head_dim

    forward FLOPs of the token at position t (it attends to t + 1 keys, itself included):
        2 * N  +  2 * L * (t + 1) * d_attn * 2        (QK^T and AV; a multiply-add is 2 FLOPs)
    forward + backward = 3 x forward                    (so 6 * N per token for the dense part)

Summed over a row whose `n` new tokens follow `c` tokens already in the KV cache, the positions
are c .. c + n - 1, so the attention sum has a closed form:

    sum_{t=c}^{c+n-1} (t + 1)  =  n * c + n * (n + 1) / 2

    forward_flops = sum_b [ 2 * N * n_b  +  4 * L * d_attn * (n_b * c_b + n_b * (n_b + 1) / 2) ]

Sampling with a KV cache (prefill the prompt, then one token at a time against the cache) puts
every token at the same position, with the same keys, as one forward over the whole sequence,
so sampling p + m tokens costs exactly forward_flops(0, p + m): sampling and scoring the same
tokens are counted the same.

These are *model* FLOPs (the numerator of MFU), a convention for comparing runs and recipes,
not a measurement of what the hardware executed. Deliberately not modelled:
- the input-embedding lookup is counted as a matmul (2 * V * d per token for untied models),
  as Chinchilla does; it is a gather;
- the LM head is counted on every token, though scorers and samplers compute logits only at
  completion positions (`logits_to_keep`) and at the last prompt token;
- attention is counted causally, (t + 1) keys; an eager kernel that computes the full square
  and masks does about twice that, and softmax, norms, RoPE and activations are not counted;
- padding, finished rows that keep decoding in a batch, and recomputation (activation
  checkpointing) are not counted: only real tokens are;
- a prompt shared by a group's rows is counted once per row, though the KV sampler prefills it
  once, and an in-process teacher and the trainer run it once (fast/shared_prompt.py);
- the last sampled token of a row is never fed back into the model by a sampler, so sampling
  is over-counted by one token per row, kept so sampling == scoring for the same tokens;
- a mixture-of-experts model counts every expert, though each token runs only its top-k
  (Qwen3-30B-A3B: N ~ 30B, active ~ 3B); build ModelShape(active_params, ...) by hand for one.
  A multimodal model's vision tower is counted too, though text tokens never run it;
- training a LoRA adapter counts 6 * N over base + adapter parameters, as if every weight
  received a gradient; frozen base weights skip their weight-gradient matmuls, so the true
  cost is nearer 4 * N_base + 6 * N_adapter per token.

Lengths are lists or 1-D long tensors of real-token counts per row (no padding). Results are
Python ints, exact at any size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ModelShape:
    params: int  # N: all parameters, tied weights once (base + adapter for a peft model)
    n_layers: int  # L
    d_attn: int  # num_attention_heads * head_dim (query heads: GQA shrinks K/V, not the scores)


def model_shape(model) -> ModelShape:
    """The shape of a Hugging Face causal LM, or of a peft model wrapping one.

    params sums each distinct parameter tensor once (tied embeddings are one tensor); for a
    peft model that is the frozen base plus the adapter weights, which do run in every forward.
    """
    seen: dict[int, int] = {}
    for param in model.parameters():
        seen.setdefault(id(param), param.numel())
    config = model.config  # a PeftModel forwards .config to the model it wraps
    if hasattr(config, "get_text_config"):  # multimodal configs nest the language model's
        config = config.get_text_config()
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return ModelShape(sum(seen.values()), config.num_hidden_layers, heads * head_dim)


def _lengths(name: str, lens_B: Sequence[int] | torch.Tensor) -> torch.Tensor:
    lens_B = torch.as_tensor(lens_B, dtype=torch.long).cpu()
    if lens_B.dim() != 1:
        raise ValueError(
            f"{name} must be 1-D (one length per row), got shape {tuple(lens_B.shape)}"
        )
    if (lens_B < 0).any():
        raise ValueError(f"{name} has a negative length: {lens_B.tolist()}")
    return lens_B


def forward_flops(
    shape: ModelShape,
    context_lens_B: Sequence[int] | torch.Tensor,
    new_lens_B: Sequence[int] | torch.Tensor,
) -> int:
    """FLOPs of a forward over new_lens[b] tokens that follow context_lens[b] cached tokens."""
    context_B = _lengths("context_lens_B", context_lens_B)
    new_B = _lengths("new_lens_B", new_lens_B)
    if context_B.shape != new_B.shape:
        raise ValueError(
            f"context_lens_B has {context_B.numel()} rows but new_lens_B has {new_B.numel()}"
        )
    tokens = int(new_B.sum())
    # sum over rows of sum_{t=c}^{c+n-1} (t + 1); n * (n + 1) is even, so // is exact
    key_visits = int((new_B * context_B + new_B * (new_B + 1) // 2).sum())
    return 2 * shape.params * tokens + 4 * shape.n_layers * shape.d_attn * key_visits


def sampling_flops(
    shape: ModelShape,
    prompt_lens_B: Sequence[int] | torch.Tensor,
    completion_lens_B: Sequence[int] | torch.Tensor,
) -> int:
    """Prefill of each prompt plus token-by-token decoding of its completion with a KV cache.

    Equal to forward_flops(shape, 0, prompt + completion): see the module docstring.
    """
    total_B = _lengths("prompt_lens_B", prompt_lens_B) + _lengths(
        "completion_lens_B", completion_lens_B
    )
    return forward_flops(shape, torch.zeros_like(total_B), total_B)


def train_flops(shape: ModelShape, seq_lens_B: Sequence[int] | torch.Tensor) -> int:
    """Forward + backward over whole sequences: 3 x the forward (6 * N per token + attention)."""
    seq_B = _lengths("seq_lens_B", seq_lens_B)
    return 3 * forward_flops(shape, torch.zeros_like(seq_B), seq_B)


class Ledger:
    """Per-phase FLOPs and wall seconds, for this step and since the start of the run.

    Phases are free-form names; the training loop uses "student_sampling", "teacher_scoring",
    "teacher_sampling" and "train". Per-rank: sum the step values over ranks before logging.
    """

    def __init__(self) -> None:
        self.step_flops: dict[str, float] = {}
        self.step_seconds: dict[str, float] = {}
        self.total_flops: dict[str, float] = {}
        self.total_seconds: dict[str, float] = {}

    def add(self, phase: str, flops: float, seconds: float = 0.0) -> None:
        for table, value in (
            (self.step_flops, flops),
            (self.step_seconds, seconds),
            (self.total_flops, flops),
            (self.total_seconds, seconds),
        ):
            table[phase] = table.get(phase, 0.0) + float(value)

    def step_metrics(self, totals: bool = True) -> dict[str, float]:
        """This step's metrics, then the step counters are reset.

        flops/<phase> (this step), flops/<phase>_total (run so far), flops/<phase>_per_s (this
        step's achieved rate, when seconds were recorded), and with totals flops/step and
        flops/total. Every phase seen so far is reported each step (0.0 when idle), so the keys
        stay stable.
        """
        metrics: dict[str, float] = {}
        for phase, total in self.total_flops.items():
            flops = self.step_flops.get(phase, 0.0)
            metrics[f"flops/{phase}"] = flops
            metrics[f"flops/{phase}_total"] = total
            seconds = self.step_seconds.get(phase, 0.0)
            if seconds > 0:
                metrics[f"flops/{phase}_per_s"] = flops / seconds
        if totals:
            metrics["flops/step"] = sum(self.step_flops.values())
            metrics["flops/total"] = sum(self.total_flops.values())
        self.step_flops, self.step_seconds = {}, {}
        return metrics

    def state_dict(self) -> dict[str, dict[str, float]]:
        """Plain floats in plain dicts: survives json.dumps/json.loads exactly."""
        return {
            "step_flops": dict(self.step_flops),
            "step_seconds": dict(self.step_seconds),
            "total_flops": dict(self.total_flops),
            "total_seconds": dict(self.total_seconds),
        }

    def load_state_dict(self, state: dict[str, dict[str, float]]) -> None:
        self.step_flops = {k: float(v) for k, v in state.get("step_flops", {}).items()}
        self.step_seconds = {k: float(v) for k, v in state.get("step_seconds", {}).items()}
        # a checkpoint written before the ledger existed has none: start from zero
        self.total_flops = {k: float(v) for k, v in state.get("total_flops", {}).items()}
        self.total_seconds = {k: float(v) for k, v in state.get("total_seconds", {}).items()}


def step_phases(
    batch,
    student: ModelShape,
    sampling: tuple[str, ModelShape] | None,
    teachers: dict[str, ModelShape],
    seconds: dict[str, float],
) -> dict[str, tuple[int, float]]:
    """{phase: (model FLOPs, seconds)} of one step's batch on this rank.

    sampling: (phase name, shape of the model that sampled), None when nothing was sampled (rows
    replayed from data); teachers: the in-process teachers' shapes by name (a served teacher's
    size is not known here: it is not counted); seconds: "sample", "score", "train".
    """
    prompt_B = batch.attention_mask_BT[:, : batch.prompt_len].sum(1).cpu()
    completion_B = batch.completion_mask_BT.sum(1).cpu()
    seq_B = prompt_B + completion_B
    phases = {"train": (train_flops(student, seq_B), seconds["train"])}
    if sampling is not None:
        name, shape = sampling
        phases[name] = (sampling_flops(shape, prompt_B, completion_B), seconds["sample"])
    if batch.teacher_B is not None:
        flops = 0
        for name, shape in teachers.items():
            rows = torch.tensor([n == name for n in batch.teacher_B], dtype=torch.bool)
            flops += forward_flops(shape, torch.zeros_like(seq_B[rows]), seq_B[rows])
        phases["teacher_scoring"] = (flops, seconds["score"])
    if batch.policy_lp_BT is not None:  # rows an older policy sampled, re-scored by the student
        phases["student_rescoring"] = (forward_flops(student, torch.zeros_like(seq_B), seq_B), 0.0)
    return phases
