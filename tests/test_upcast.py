"""upcast.py: bf16/fp16 linears multiplied in float32 on a CPU without fast half kernels."""

import copy

import pytest
import torch

from opd.fast import upcast
from opd.fast.packed import call_module


@pytest.fixture
def slow(monkeypatch):
    """Behave as on a CPU without bf16/fp16 matrix instructions, whatever this one has."""
    monkeypatch.setattr(upcast, "slow_half", lambda dtype: dtype in (torch.bfloat16, torch.float16))


def test_the_query_answers_for_half_types_only():
    assert upcast.slow_half(torch.float32) is False
    assert isinstance(upcast.slow_half(torch.bfloat16), bool)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias", [True, False])
def test_float32_linear_gives_the_half_linear_and_its_gradients(slow, dtype, bias):
    torch.manual_seed(0)
    lin = torch.nn.Linear(48, 40, bias=bias).to(dtype)
    ref = copy.deepcopy(lin).double()  # the same half values, multiplied exactly
    x = torch.randn(2, 5, 48).to(dtype).requires_grad_()
    x_ref = x.detach().double().requires_grad_()
    y = call_module(lin, x)
    assert type(y.grad_fn).__name__ == "_Float32LinearBackward"
    assert y.dtype == dtype and y.shape == (2, 5, 40)
    y_ref = ref(x_ref)
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-2, atol=1e-2)
    g = torch.randn(2, 5, 40).to(dtype)
    y.backward(g)
    y_ref.backward(g.double())
    torch.testing.assert_close(x.grad.double(), x_ref.grad, rtol=1e-2, atol=2e-2)
    torch.testing.assert_close(lin.weight.grad.double(), ref.weight.grad, rtol=1e-2, atol=2e-2)
    assert lin.weight.grad.dtype == dtype
    if bias:
        torch.testing.assert_close(lin.bias.grad.double(), ref.bias.grad, rtol=1e-2, atol=2e-2)


def test_a_fresh_copy_every_call_follows_a_fused_optimizer_step(slow):
    """torch's fused AdamW updates weights in place without bumping their version counter: a
    float32 copy cached by version would go stale; none is kept."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(16, 8).to(torch.bfloat16)
    opt = torch.optim.AdamW(lin.parameters(), lr=0.1, fused=True)
    x = torch.randn(4, 16).bfloat16()
    before = call_module(lin, x)
    before.float().sum().backward()
    opt.step()  # torch 2.13's fused step leaves lin.weight._version as it was
    after = call_module(lin, x)
    assert not torch.equal(after, before)
    want = torch.nn.functional.linear(x.float(), lin.weight.float(), lin.bias.float())
    torch.testing.assert_close(after, want.bfloat16(), rtol=0, atol=0)


def test_everything_else_runs_the_module(slow):
    x = torch.randn(3, 16)
    lin = torch.nn.Linear(16, 8)
    assert type(call_module(lin, x).grad_fn).__name__ == "AddmmBackward0"  # float32
    hooked = torch.nn.Linear(16, 8).bfloat16()
    hooked.register_forward_hook(lambda mod, inp, out: out * 0)
    assert (call_module(hooked, x.bfloat16()) == 0).all()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not upcast.upcasts(lin.weight.bfloat16(), x.bfloat16())


def test_compute_weight_is_a_float32_copy_only_where_it_upcasts(slow, monkeypatch):
    w, x = torch.randn(8, 4).bfloat16(), torch.randn(2, 4).bfloat16()
    assert upcast.compute_weight(w, x).dtype == torch.float32
    w32 = w.float()
    assert upcast.compute_weight(w32, x.float()) is w32
    monkeypatch.setattr(upcast, "slow_half", lambda dtype: False)
    assert upcast.compute_weight(w, x) is w


# ------------------------------------------------------------------ the fast paths, end to end


def rollouts(model, tok, backend="hf", seed=0):
    from opd.data import Prompt
    from opd.samplers import make_sampler

    words = ["ab=", "abcdef=", "q="]  # ragged prompts, 3 rows each: shared prompts
    prompts = [Prompt(ids=tok(w)["input_ids"], row={}, where=w) for w in words]
    sampler = make_sampler(model, tok, len(tok), 10, backend=backend)
    return sampler.sample(prompts, 3, torch.Generator().manual_seed(seed))


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.double() - ref.double()).norm() / ref.double().norm()).item()


def test_bf16_fast_paths_are_as_accurate_as_the_plain_bf16_forward(slow):
    """On a CPU without bf16 kernels the fast paths multiply bf16 in float32: the sampler's
    log-probs, the teacher's scores and the trainer's gradients stay as close to float32 as the
    plain bf16 forward's (which runs torch's own bf16 kernels)."""
    from opd import tiny
    from opd.fast.heads import fused_token_loss
    from opd.fast.shared_prompt import shared_prompt_hidden
    from opd.logprobs import completion_logprobs
    from opd.objectives import policy_gradient_loss
    from opd.teachers.local import LocalTeacher

    tok = tiny.char_tokenizer()
    V = len(tok)
    ref = tiny.tiny_model(tok, hidden=64, layers=2, seed=5, tied=True)
    b = rollouts(ref, tok)
    args = (b.tokens_BT, b.attention_mask_BT)
    mask_BT = b.completion_mask_BT
    n = int(mask_BT.sum())
    adv_BT = torch.randn(mask_BT.shape, generator=torch.Generator().manual_seed(1))

    # the teacher's scores: fast (shared prompt, packed float32 copies, chunked head) and plain
    with torch.inference_mode():
        want = completion_logprobs(ref, *args, b.prompt_len, V)[mask_BT]
    bf16 = copy.deepcopy(ref).to(torch.bfloat16)
    scores = {
        fast: LocalTeacher(copy.deepcopy(bf16), V, fast=fast).score(b)[mask_BT]
        for fast in (True, False)
    }
    assert rel_err(scores[True], want) <= 1.5 * rel_err(scores[False], want) + 1e-4

    # the trainer's gradient of the sampled-token loss, every parameter
    def grads(model, fast: bool) -> torch.Tensor:
        if fast:
            s_N, a_N = b.sampler_lp_BT[mask_BT], adv_BT[mask_BT]
            ones = torch.ones(n, dtype=torch.bool)

            def chunk_loss(lp_n, sl):
                return policy_gradient_loss(lp_n, s_N[sl], a_N[sl], ones[sl], n)[0]

            hidden = shared_prompt_hidden(model, *args, mask_BT, b.prompt_len)
            assert hidden is not None
            fused_token_loss(model, *args, mask_BT, V, chunk_loss, 7, hidden)[0].backward()
        else:
            lp_BT = completion_logprobs(model, *args, b.prompt_len, V)
            policy_gradient_loss(lp_BT, b.sampler_lp_BT, adv_BT, mask_BT, n)[0].backward()
        return torch.cat([p.grad.double().flatten() for p in model.parameters()])

    g_ref = grads(ref, False)
    g_fast, g_plain = grads(copy.deepcopy(bf16), True), grads(copy.deepcopy(bf16), False)
    assert rel_err(g_fast, g_ref) <= 1.5 * rel_err(g_plain, g_ref) + 1e-4

    # the KV sampler's log-probs of what it drew, against float32 scoring of the same tokens
    drawn = {backend: rollouts(bf16, tok, backend) for backend in ("kv", "hf")}
    errs = {}
    for backend, r in drawn.items():
        with torch.inference_mode():
            lp = completion_logprobs(ref, r.tokens_BT, r.attention_mask_BT, r.prompt_len, V)
        m = r.completion_mask_BT
        errs[backend] = rel_err(r.sampler_lp_BT[m], lp[m])
    assert errs["kv"] <= 1.5 * errs["hf"] + 1e-4, errs


@pytest.mark.parametrize(
    "flags,warned",
    [
        ({"run.autocast": "bfloat16"}, "run.autocast=bfloat16"),
        ({"model.dtype": "bfloat16", "run.fast_paths": False}, "run.fast_paths=false"),
        ({"model.dtype": "bfloat16"}, None),  # the fast paths multiply it in float32
        ({}, None),
    ],
)
def test_a_run_that_would_multiply_bf16_slowly_is_told(flags, warned, monkeypatch, capsys):
    from opd import build
    from opd.config import build_config

    monkeypatch.setattr(build, "slow_half", lambda dtype: True)
    base = {"model.student": "s", "model.teacher": "t", "data.prompts": "p", "run.out": "o"}
    cfg = build_config(None, {**base, **flags}, [])
    build.warn_slow_half(cfg)
    err = capsys.readouterr().err
    assert (warned in err and "no bf16 matrix kernels" in err) if warned else err == ""
    monkeypatch.setattr(build, "slow_half", lambda dtype: False)
    build.warn_slow_half(cfg)
    assert capsys.readouterr().err == ""
