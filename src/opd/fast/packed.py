"""Linear layers through oneDNN with the weight packed once, for float32 inference on a CPU.

PyTorch's default CPU matrix multiply re-lays the weight out on every call. oneDNN's linear
with a weight packed ahead of time (the path torch.compile's CPU backend uses for frozen
weights) runs the short, wide multiplies of this project faster: a decode step's LM head, or a
teacher's MLP (`python benchmarks/hot_paths.py` measures by how much on this machine).
Packing copies the weight, so it pays where one packing serves many calls: a frozen teacher's
layers (packed once, kept while the weight is unchanged) and the sampler's LM head (packed once
per batch of decode steps).

The ops are torch's own (`torch.ops.mkldnn`), but not public API: `packing_works` tries them
once on a small layer against `F.linear`, and everything falls back to the module's own forward
when they are missing or disagree. Only plain `torch.nn.Linear` modules without hooks, float32
(or bf16/fp16 where `upcast.py` multiplies them in float32: the packed copy is float32), on a
CPU, outside autocast and autograd are packed; anything else runs `call_module`.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from opd.fast import upcast


@functools.cache
def packing_works() -> bool:
    try:
        g = torch.Generator().manual_seed(0)
        x, w, b = (torch.randn(*s, generator=g) for s in ((5, 8), (3, 8), (3,)))
        packed = torch.ops.mkldnn._reorder_linear_weight(w, 5)
        out = torch.ops.mkldnn._linear_pointwise(x, packed, b, "none", [], "")
        return bool(torch.allclose(out, F.linear(x, w, b), atol=1e-5))
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


def packable(module, x: torch.Tensor) -> bool:
    w = module.weight
    return (
        upcast.plain_linear(module)
        and (w.dtype == torch.float32 == x.dtype or upcast.upcasts(w, x))
        and x.device.type == "cpu"
        and module.weight.device.type == "cpu"
        and not torch.is_autocast_enabled("cpu")
        and not (torch.is_grad_enabled() and (x.requires_grad or module.weight.requires_grad))
        and packing_works()
    )


class PackedLinears:
    """`linear(module, x)`: module(x), through a packed copy of its weight where it can be.

    A copy is made at a layer's first call and kept while the weight's storage and version
    counter stay the same (an in-place op such as `mul_` repacks it; torch's fused AdamW
    updates weights without bumping the counter, so trained weights get a PackedLinears per
    batch, never one kept across steps).
    only: pack these modules and run every other one through its own forward.
    """

    def __init__(self, only=None):
        self.packed: dict[int, tuple[tuple[int, int], torch.Tensor]] = {}
        self.only = None if only is None else {id(m) for m in only}

    def __call__(self, module, x: torch.Tensor) -> torch.Tensor:
        if (self.only is not None and id(module) not in self.only) or not packable(module, x):
            return call_module(module, x)
        w = module.weight
        stamp = (w.data_ptr(), w._version)
        entry = self.packed.get(id(module))
        if entry is None or entry[0] != stamp:
            rows = x.numel() // x.shape[-1]
            entry = self.packed[id(module)] = (
                stamp,
                torch.ops.mkldnn._reorder_linear_weight(w.detach().float(), rows),
            )
        bias = None if module.bias is None else module.bias.detach().float()
        out = torch.ops.mkldnn._linear_pointwise(x.float(), entry[1], bias, "none", [], "")
        return out.to(x.dtype)


def call_module(module, x: torch.Tensor) -> torch.Tensor:
    """The default `linear`: the module's own forward (LoRA wrappers, hooks and all), a plain
    half-precision linear multiplied in float32 on a CPU without half kernels (`upcast.py`)."""
    return upcast.linear(module, x)
