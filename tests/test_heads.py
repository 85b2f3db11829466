"""The chunked LM head: the same log-probs, losses and gradients as the plain full-logits path."""

import copy

import pytest
import torch

from opd import tiny
from opd.fast.heads import fused_token_loss, plain_head, score_completions
from opd.logprobs import completion_logprobs
from opd.models import add_lora
from opd.objectives import nll_loss, policy_gradient_loss


@pytest.fixture(scope="module")
def tok():
    return tiny.char_tokenizer()


def batch(tok, seed=0):
    """Left-padded prompts of width P, ragged completions (some rows end early)."""
    g = torch.Generator().manual_seed(seed)
    B, P, T, V = 4, 6, 15, len(tok)
    tokens_BT = torch.randint(4, V, (B, T), generator=g)
    attention_BT = torch.ones_like(tokens_BT)
    attention_BT[0, :3], attention_BT[2, :1] = 0, 0
    tokens_BT[attention_BT == 0] = tok.pad_token_id
    mask_BT = torch.zeros_like(tokens_BT, dtype=torch.bool)
    mask_BT[:, P:] = True
    mask_BT[1, -4:] = False  # a row that finished early: pad after it
    attention_BT[1, -4:] = 0
    tokens_BT[1, -4:] = tok.pad_token_id
    sampler_lp_BT = -torch.rand(B, T, generator=g) * 3
    adv_BT = torch.randn(B, T, generator=g)
    return tokens_BT, attention_BT, mask_BT, P, sampler_lp_BT, adv_BT


def reference_and_fused(model, tok, loss_kind, chunk, clip=0.0):
    tokens_BT, attn_BT, mask_BT, P, s_lp_BT, adv_BT = batch(tok)
    V, n_tokens = len(tok), int(mask_BT.sum()) + 3  # a global count larger than this batch's
    ref, fused = model, copy.deepcopy(model)
    lp_BT = completion_logprobs(ref, tokens_BT, attn_BT, P, V)
    if loss_kind == "sft":
        loss = nll_loss(lp_BT, mask_BT, n_tokens)
    else:
        loss = policy_gradient_loss(lp_BT, s_lp_BT, adv_BT, mask_BT, n_tokens, clip)[0]
    loss.backward()
    s_lp_N, adv_N = s_lp_BT[mask_BT], adv_BT[mask_BT]

    def chunk_loss(lp_n, sl):
        ones = torch.ones_like(lp_n, dtype=torch.bool)
        if loss_kind == "sft":
            return nll_loss(lp_n, ones, n_tokens)
        return policy_gradient_loss(lp_n, s_lp_N[sl], adv_N[sl], ones, n_tokens, clip)[0]

    loss_f, lp_N, _ = fused_token_loss(fused, tokens_BT, attn_BT, mask_BT, V, chunk_loss, chunk)
    loss_f.backward()
    return (ref, loss, lp_BT[mask_BT]), (fused, loss_f, lp_N)


@pytest.mark.parametrize(
    "arch,loss_kind,chunk,clip,tied",
    [
        ("llama", "pg", 1, 0.0, False),
        ("llama", "pg", 7, 0.2, False),  # PPO clipping: some tokens get no gradient
        ("llama", "sft", 1000, 0.0, False),
        ("qwen3", "pg", 16, 0.0, False),
        ("llama", "pg", 5, 0.0, True),  # the head is the input embedding: both gradients add
    ],
)
def test_fused_loss_equals_the_full_logits_path(tok, arch, loss_kind, chunk, clip, tied):
    # vocab_pad: padded embedding rows must take no mass and get no gradient
    model = tiny.tiny_model(tok, arch=arch, hidden=32, layers=2, vocab_pad=7, seed=3, tied=tied)
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == tied
    (ref, loss, lp), (fused, loss_f, lp_f) = reference_and_fused(model, tok, loss_kind, chunk, clip)
    assert torch.allclose(lp, lp_f, atol=1e-5)
    assert loss_f.item() == pytest.approx(loss.item(), abs=1e-6)
    for (name, a), (_, b) in zip(ref.named_parameters(), fused.named_parameters(), strict=True):
        assert torch.allclose(a.grad, b.grad, atol=1e-6, rtol=1e-4), name
    head = fused.get_output_embeddings().weight.grad
    assert (head[len(tok) :] == 0).all()


def test_fused_loss_gradient_follows_the_incoming_gradient_and_no_tokens_give_zero(tok):
    model = tiny.tiny_model(tok, hidden=32, layers=2, vocab_pad=7, seed=4)
    tokens_BT, attn_BT, mask_BT, _, _, _ = batch(tok)
    V = len(tok)

    def chunk_loss(lp_n, sl):
        return -(lp_n * torch.linspace(0.5, 1.5, lp_n.shape[0])).sum()

    def head_grad(scale, mask):
        model.zero_grad(set_to_none=True)
        loss, _, _ = fused_token_loss(model, tokens_BT, attn_BT, mask, V, chunk_loss, 5)
        (loss * scale).backward()
        return model.get_output_embeddings().weight.grad.clone()

    one = head_grad(1.0, mask_BT)  # loss.backward(): the saved gradient as it is
    assert torch.allclose(head_grad(-2.5, mask_BT), -2.5 * one, atol=1e-6)
    none = head_grad(1.0, torch.zeros_like(mask_BT))  # no completion token: nothing unset
    assert torch.equal(none, torch.zeros_like(none))


def test_fused_loss_with_lora_leaves_the_frozen_head_alone(tok):
    model = add_lora(tiny.tiny_model(tok, hidden=32, layers=2, seed=5), 4, 8, "all-linear")
    (ref, _, lp), (fused, _, lp_f) = reference_and_fused(model, tok, "pg", 5)
    assert torch.allclose(lp, lp_f, atol=1e-5)
    grads = {n: p.grad for n, p in fused.named_parameters() if p.requires_grad}
    assert grads and all("lora" in n for n in grads)
    for (name, a), (_, b) in zip(ref.named_parameters(), fused.named_parameters(), strict=True):
        if a.requires_grad:
            assert torch.allclose(a.grad, b.grad, atol=1e-6, rtol=1e-4), name
    assert fused.get_output_embeddings().weight.grad is None


def test_chunked_scoring_equals_full_logits(tok):
    model = tiny.tiny_model(tok, hidden=32, layers=2, vocab_pad=5, seed=2).eval()
    tokens_BT, attn_BT, mask_BT, P, _, _ = batch(tok, seed=1)
    with torch.inference_mode():
        ref_BT = completion_logprobs(model, tokens_BT, attn_BT, P, len(tok))
        got_BT = score_completions(model, tokens_BT, attn_BT, mask_BT, len(tok), chunk=3)
    assert torch.allclose(got_BT[mask_BT], ref_BT[mask_BT], atol=1e-5)
    assert (got_BT[~mask_BT] == 0).all()


def test_heads_that_are_not_plain_take_the_plain_path(tok):
    model = tiny.tiny_model(tok, hidden=32, layers=1)
    assert plain_head(model) is model.get_output_embeddings()
    model.config.final_logit_softcapping = 30.0  # Gemma: logits change after the head
    assert plain_head(model) is None
    lora_head = add_lora(tiny.tiny_model(tok, hidden=32, layers=1), 2, 4, "all-linear")
    assert plain_head(lora_head) is not None  # LoRA on the body only: the head is still plain


def test_bf16_fused_head_gradient_is_as_accurate_as_the_plain_path(tok):
    """Many chunks must not add bf16 rounding: the head's gradient is summed in float32."""
    model = tiny.tiny_model(tok, hidden=32, layers=2, seed=4)
    fp32_model = copy.deepcopy(model)
    bf16_plain, bf16_fused = model.to(torch.bfloat16), copy.deepcopy(model).to(torch.bfloat16)
    grads = {}
    for name, m, chunk in [
        ("ref", fp32_model, None),
        ("plain", bf16_plain, None),
        ("fused", bf16_fused, 1),
    ]:
        # 16 copies of the batch: ~500 positions, one chunk each
        tokens_BT, attn_BT, mask_BT, P, s_lp_BT, adv_BT = (
            t.repeat(16, 1) if torch.is_tensor(t) else t for t in batch(tok)
        )
        n = int(mask_BT.sum())
        if chunk is None:
            lp_BT = completion_logprobs(m, tokens_BT, attn_BT, P, len(tok))
            policy_gradient_loss(lp_BT, s_lp_BT, adv_BT, mask_BT, n)[0].backward()
        else:
            s_N, a_N = s_lp_BT[mask_BT], adv_BT[mask_BT]
            ones = torch.ones(n, dtype=torch.bool)

            def chunk_loss(lp_n, sl, s_N=s_N, a_N=a_N, ones=ones, n=n):
                return policy_gradient_loss(lp_n, s_N[sl], a_N[sl], ones[sl], n)[0]

            fused_token_loss(m, tokens_BT, attn_BT, mask_BT, len(tok), chunk_loss, chunk)[
                0
            ].backward()
        grads[name] = m.get_output_embeddings().weight.grad.float()
    ref = grads["ref"]

    def err(g):
        return ((g - ref).norm() / ref.norm()).item()

    # measured: the plain path 0.56% from float32; the fused one summed in bf16 over the
    # chunks: 2.4%
    assert err(grads["fused"]) < 2 * err(grads["plain"]) + 1e-3, (
        err(grads["fused"]),
        err(grads["plain"]),
    )


def test_hooks_on_the_head_take_the_plain_path(tok):
    model = tiny.tiny_model(tok, hidden=32, layers=1)
    handle = model.get_output_embeddings().register_forward_hook(lambda m, i, o: o * 2)
    assert plain_head(model) is None
    handle.remove()
    assert plain_head(model) is not None


def test_scratch_buffer_is_reused_per_thread_and_per_inference_mode():
    import threading

    from opd.fast.heads import scratch

    cpu = torch.device("cpu")
    a = scratch(4, 10, torch.float32, cpu)
    b = scratch(2, 10, torch.float32, cpu)  # smaller: a view of the same memory
    assert a.shape == (4, 10) and b.shape == (2, 10) and b.data_ptr() == a.data_ptr()
    c = scratch(8, 10, torch.float32, cpu)  # larger: a new buffer, kept from then on
    assert c.data_ptr() == scratch(8, 10, torch.float32, cpu).data_ptr()
    with torch.inference_mode():
        d = scratch(4, 10, torch.float32, cpu)
        assert d.is_inference() and d.data_ptr() != c.data_ptr()
    c.fill_(1.0)  # a normal buffer can still be written outside inference mode
    other = []
    t = threading.Thread(target=lambda: other.append(scratch(8, 10, torch.float32, cpu)))
    t.start()
    t.join()
    assert other[0].data_ptr() != c.data_ptr()  # a thread pool's requests never share one


def test_head_logits_keep_autocast_and_weight_precision():
    from opd.fast.heads import head_logits

    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(5, 16, generator=g), torch.randn(30, 16, generator=g)
    exact = h @ w.T
    assert torch.allclose(head_logits(h, w), exact, atol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # out= would have multiplied in fp32
        amp = head_logits(h, w).clone()
    assert amp.dtype == torch.float32
    assert torch.equal(amp, (h.bfloat16() @ w.bfloat16().T).float())
    assert not torch.allclose(amp, exact, atol=1e-4)
    bf16 = head_logits(h.bfloat16(), w.bfloat16())
    assert torch.equal(bf16, (h.bfloat16() @ w.bfloat16().T).float())


def test_log_softmax_in_place_over_a_wide_chunk_equals_out_of_place():
    # log_softmax_chunk writes over its input; torch's row kernel must read a row before it
    # writes it, for any row width (one vector, many, past the cache) and extreme logits.
    from opd.fast.heads import log_softmax_chunk

    g = torch.Generator().manual_seed(0)
    for cols in (7, 64, 1000, 40_000):
        z = torch.randn(33, cols, generator=g) * 30
        z[0] = 0.0  # a flat row
        z[1, 3] = 1e4  # one logit far above the rest: the others underflow to -1e4
        z[2, :] = -1e30
        expected = torch.log_softmax(z.clone(), -1)
        out = log_softmax_chunk(z)
        assert out.data_ptr() == z.data_ptr()
        assert torch.equal(out, expected), cols
