"""packed.PackedLinears: oneDNN-packed linear layers for float32 inference on a CPU."""

import pytest
import torch

from opd.fast import upcast
from opd.fast.packed import PackedLinears, packable, packing_works

pytestmark = pytest.mark.skipif(not packing_works(), reason="this torch build lacks oneDNN linear")


def layer(bias=True, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Linear(16, 24, bias=bias).requires_grad_(False)


@pytest.mark.parametrize("bias", [True, False])
def test_packed_linear_equals_the_module_and_follows_weight_updates(bias):
    lin, packed = layer(bias), PackedLinears()
    x = torch.randn(7, 16)
    with torch.inference_mode():
        assert torch.allclose(packed(lin, x), lin(x), atol=1e-5)
    assert id(lin) in packed.packed
    stamp = packed.packed[id(lin)][0]
    with torch.no_grad():
        lin.weight.mul_(2.0)  # an in-place update: the next call must repack
    with torch.inference_mode():
        assert torch.allclose(packed(lin, x), lin(x), atol=1e-5)
    assert packed.packed[id(lin)][0] != stamp


def test_what_is_not_packed_runs_its_own_forward():
    x = torch.randn(3, 16)
    hooked = layer()
    hooked.register_forward_hook(lambda mod, inp, out: out * 0)
    assert not packable(hooked, x)
    assert (PackedLinears()(hooked, x) == 0).all()  # the hook ran
    bf16 = layer().to(torch.bfloat16)  # packed as float32 only where upcast.py upcasts
    assert packable(bf16, x.bfloat16()) == upcast.slow_half(torch.bfloat16)
    trained = torch.nn.Linear(16, 24)  # requires grad, autograd on
    assert not packable(trained, x)
    y = PackedLinears()(trained, x)
    assert y.requires_grad and y.grad_fn is not None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not packable(layer(), x)
    a, b = layer(seed=1), layer(seed=2)
    only_a = PackedLinears(only=[a])
    with torch.inference_mode():
        only_a(a, x), only_a(b, x)
    assert list(only_a.packed) == [id(a)]


@pytest.mark.parametrize("bias", [True, False])
def test_half_layers_pack_a_float32_copy_where_half_multiplies_are_slow(bias, monkeypatch):
    monkeypatch.setattr(upcast, "slow_half", lambda dtype: True)
    lin, packed = layer(bias).to(torch.bfloat16), PackedLinears()
    x = torch.randn(7, 16).bfloat16()
    with torch.inference_mode():
        got = packed(lin, x)
    assert packed.packed[id(lin)][1].dtype == torch.float32
    b = None if lin.bias is None else lin.bias.double()
    want = torch.nn.functional.linear(x.double(), lin.weight.double(), b)
    assert got.dtype == torch.bfloat16
    assert torch.allclose(got.double(), want, rtol=1e-2, atol=1e-2)
