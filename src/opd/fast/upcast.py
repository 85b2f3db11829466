"""bf16/fp16 matrix multiplies done in float32 on a CPU that has no fast kernel for them.

On a CPU without bf16 (fp16) matrix instructions that oneDNN can use (AVX2 machines; oneDNN
says so through `torch.ops.mkldnn._is_mkldnn_bf16_supported`), PyTorch multiplies bf16
matrices with a reference kernel tens to hundreds of times slower than its float32 GEMM
(`python benchmarks/hot_paths.py --half` measures both here). A bf16 GEMM multiplies the
bf16 inputs exactly and accumulates in float32; doing the same with float32 copies of the
inputs, then rounding the output to bf16, is the same arithmetic, through the fast kernel.

`linear(module, x)` runs a plain `torch.nn.Linear` that way, forward and backward, when its
weight and input share such a half dtype on a CPU without the instructions, with a float32 copy
of the weight made for the call (a fraction of the multiply's time; an optimizer step changes
the weight in place without telling anyone, so no copy outlives the call). Code that calls the
same frozen weights many times packs float32 copies once instead (`packed.PackedLinears`: the
teacher, a batch of decode steps). `compute_weight` is the LM head's weight, the same way.
Everywhere else nothing changes.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

_HALF_SUPPORT = {
    torch.bfloat16: "_is_mkldnn_bf16_supported",
    torch.float16: "_is_mkldnn_fp16_supported",
}


@functools.cache
def slow_half(dtype: torch.dtype) -> bool:
    """True when this CPU multiplies `dtype` matrices without oneDNN's fast kernels."""
    name = _HALF_SUPPORT.get(dtype)
    if name is None:
        return False
    try:
        return not bool(getattr(torch.ops.mkldnn, name)())
    except (AttributeError, RuntimeError):  # a torch without the query: leave it alone
        return False


def upcasts(weight: torch.Tensor, x: torch.Tensor) -> bool:
    return (
        weight.dtype == x.dtype
        and weight.device.type == "cpu"
        and x.device.type == "cpu"
        and slow_half(weight.dtype)
        and not torch.is_autocast_enabled("cpu")
    )


def compute_weight(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The weight to multiply x by: a float32 copy of it where `upcasts`, else itself."""
    return weight.detach().float() if upcasts(weight, x) else weight


class _Float32Linear(torch.autograd.Function):
    """F.linear(x, weight, bias) for half x and weight, multiplied in float32."""

    @staticmethod
    def forward(ctx, x, weight, bias, w32):
        ctx.save_for_backward(x)
        ctx.w32, ctx.has_bias = w32, bias is not None
        out = F.linear(x.float(), w32, None if bias is None else bias.float())
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        g_MO = g.reshape(-1, g.shape[-1]).float()
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = (g_MO @ ctx.w32).to(x.dtype).view(x.shape)
        if ctx.needs_input_grad[1]:
            grad_w = (g_MO.T @ x.reshape(-1, x.shape[-1]).float()).to(x.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g_MO.sum(0).to(x.dtype)
        return grad_x, grad_w, grad_b, None


def plain_linear(module) -> bool:
    return type(module) is torch.nn.Linear and not (
        module._forward_hooks or module._forward_pre_hooks
    )


def linear(module, x: torch.Tensor) -> torch.Tensor:
    """module(x), multiplied in float32 where `upcasts` (plain nn.Linear only)."""
    if not (plain_linear(module) and upcasts(module.weight, x)):
        return module(x)
    return _Float32Linear.apply(x, module.weight, module.bias, module.weight.detach().float())
