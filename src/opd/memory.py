"""About how much memory one step needs (one line at the start of a run), and the refusal of a
configuration that cannot fit.

The estimate is rough (one line, to see a mistake coming): the weights on the run's device, the
gradients and AdamW's two moments of every trained weight, then the largest of the phases that
come and go within a step, each at full length (every row sampled to sampling.max_new_tokens):

    sampling   rows x (prompt + max_new_tokens) x the sampling model's KV cache per token
    training   rows of a micro-batch x tokens x layers x ~(4 hidden + 2 intermediate) values
               kept for the backward pass

A run is refused only when a floor that every step reaches, whatever the completions, is more
than the device holds: the weights, their gradients and moments, and the sampling cache of every
row's prompt (both samplers keep the prompt's keys and values for every row while decoding).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from opd.checkpoint import gb
from opd.errors import OpdError


@dataclass(frozen=True)
class StepMemory:
    weights: int  # every model on the device
    optimizer: int  # gradients + AdamW's two moments of the trained weights
    sampling: int  # the KV cache of a step's rows at full length
    training: int  # activations kept for the backward pass of one micro-batch
    floor: int  # what any step needs at least (see the module docstring)

    @property
    def total(self) -> int:
        return self.weights + self.optimizer + max(self.sampling, self.training)


def device_bytes(device: torch.device) -> int | None:
    """The memory of the run's device: a GPU's own, else the machine's RAM."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not every platform names them
        return None


def kv_bytes_per_token(model, autocast: str) -> int:
    """Keys and values of one token in every layer (bf16 ones under run.autocast=bfloat16)."""
    config = model.config
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    size = next(model.parameters()).element_size()
    size = min(size, 2) if autocast != "none" else size
    return config.num_hidden_layers * 2 * kv_heads * head_dim * size


def activation_bytes_per_token(model) -> int:
    config = model.config
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    hidden = config.hidden_size
    inter = getattr(config, "intermediate_size", None) or 4 * hidden
    size = next(model.parameters()).element_size()
    return config.num_hidden_layers * (4 * hidden + 2 * inter) * size


def _module(holder) -> bool:
    return isinstance(getattr(holder, "model", None), torch.nn.Module)


def estimate(run) -> StepMemory:
    cfg, ctx = run.cfg, run.ctx
    # In-process models only: a served teacher's or engine sampler's `model` is a name.
    models = [run.student]
    if run.teacher is not None:
        models += [t.model for t in run.teacher.teachers.values() if _module(t)]
    sampler = getattr(run.sampler, "sampler", run.sampler)
    sampling_model = sampler.model if _module(sampler) else None
    if sampling_model is not None:
        models.append(sampling_model)
    seen = {id(p): p for m in models for p in m.parameters()}
    weights = sum(p.numel() * p.element_size() for p in seen.values())
    optimizer = 3 * sum(p.numel() * p.element_size() for p in run.params)
    per_rank = cfg.data.batch_prompts // ctx.world_size
    # a step's prompts are padded to its longest: the file's longest for the estimate, its
    # shortest for the floor
    prompt, shortest = (f(len(p.ids) for p in run.prompts) for f in (max, min))
    completion = cfg.sampling.max_new_tokens
    if sampling_model is None:  # the rows' own completions: one row per prompt
        rows = per_rank
        completion = max(len(p.completion_ids or []) for p in run.prompts)
        sampling = floor_cache = 0
    else:
        rows = per_rank * cfg.sampling.group_size
        kv = kv_bytes_per_token(sampling_model, cfg.run.autocast)
        sampling = rows * (prompt + completion) * kv
        floor_cache = rows * shortest * kv
    micro = min(cfg.run.micro_batch_size or rows, rows)
    training = micro * (prompt + completion) * activation_bytes_per_token(run.student)
    floor = weights + optimizer + floor_cache
    return StepMemory(weights, optimizer, sampling, training, floor)


def check_memory(run) -> str:
    """Refuse a run whose floor is more than the device holds; else the estimate, in words."""
    m = estimate(run)
    total = device_bytes(run.ctx.device)
    if total and m.floor > total:
        cfg = run.cfg
        raise OpdError(
            f"a step needs at least {gb(m.floor)} ({gb(m.weights)} of weights, "
            f"{gb(m.optimizer)} of gradients and AdamW moments, the rest the prompts' sampling "
            f"cache for data.batch_prompts={cfg.data.batch_prompts} x sampling.group_size="
            f"{cfg.sampling.group_size} rows), more than the {gb(total)} of "
            f"{run.ctx.device.type} memory; lower data.batch_prompts or sampling.group_size"
        )
    where = f"{run.ctx.device.type} memory {gb(total)}" if total else "device memory unknown"
    return (
        f"about {gb(m.total)} for a step (weights {gb(m.weights)}, gradients and AdamW "
        f"{gb(m.optimizer)}, sampling cache {gb(m.sampling)}, training activations "
        f"{gb(m.training)}; rough); {where}"
    )
