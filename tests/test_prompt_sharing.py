"""The trainer's forward that runs each distinct prompt once: the same hidden states and the
same gradients as the plain forward over every row, for each supported architecture."""

import pytest
import torch

from opd.fast.shared_prompt import shared_prompt_hidden, shares_prompts
from opd.logprobs import completion_hidden
from opd.models import add_lora
from opd.samplers import make_sampler

from .test_fast_sampler import as_prompts, model_for


def rollouts(model, tok, max_new_tokens=12, seed=0, group=3):
    # ragged prompts (left padding), "ab=" twice (its 6 rows share one prompt pass), EOS likely
    prompts = as_prompts(tok, ("ab=", "abcdefgh=", "c=", "ab="))
    sampler = make_sampler(model, tok, len(tok), max_new_tokens, backend="hf")
    return sampler.sample(prompts, group, torch.Generator().manual_seed(seed))


def assert_same_hidden_and_gradients(model, b, params=None):
    args = (b.tokens_BT, b.attention_mask_BT, b.completion_mask_BT)
    assert shares_prompts(model, b.attention_mask_BT, b.prompt_len)
    ref = completion_hidden(model, *args)
    got = shared_prompt_hidden(model, *args, b.prompt_len)
    for r, g in zip(ref[1:], got[1:], strict=True):  # rows, columns and tokens, same order
        assert torch.equal(r, g)
    assert torch.allclose(got[0], ref[0], atol=1e-5)
    params = params or [p for p in model.parameters() if p.requires_grad]
    w_NH = torch.randn(ref[0].shape, generator=torch.Generator().manual_seed(0))
    ref_grads = torch.autograd.grad((ref[0] * w_NH).sum(), params, allow_unused=True)
    got_grads = torch.autograd.grad((got[0] * w_NH).sum(), params, allow_unused=True)
    for p, r, g in zip(params, ref_grads, got_grads, strict=True):
        if r is None:  # the LM head: not part of the hidden states
            assert g is None and p is model.get_output_embeddings().weight
            continue
        assert torch.allclose(g, r, atol=1e-5 * max(1.0, r.abs().max().item())), p.shape


@pytest.mark.parametrize("arch", ["llama", "llama-mha", "qwen3", "qwen2", "mistral"])
def test_same_hidden_states_and_gradients_as_every_row_on_its_own(tok, arch):
    model = model_for(tok, arch, seed=1).eval()
    b = rollouts(model, tok)
    lengths_B = b.completion_mask_BT.sum(1)
    assert lengths_B.min() < lengths_B.max()  # ragged completions: padding after a stop
    assert_same_hidden_and_gradients(model, b)


def test_bfloat16_models_share_prompts_within_bf16_rounding(tok):
    model = model_for(tok, "mistral", seed=8).to(torch.bfloat16).eval()  # 4 heads per kv head
    b = rollouts(model, tok, max_new_tokens=2, seed=9)  # one fed completion column: L == 1
    args = (b.tokens_BT, b.attention_mask_BT, b.completion_mask_BT)
    ref = completion_hidden(model, *args)
    got = shared_prompt_hidden(model, *args, b.prompt_len)
    assert (got[0].float() - ref[0].float()).abs().max() < 0.05  # bf16 kernels round differently
    params = [model.model.layers[0].self_attn.q_proj.weight, model.model.embed_tokens.weight]
    w_NH = torch.randn(ref[0].shape, generator=torch.Generator().manual_seed(1)).bfloat16()
    for r, g in zip(
        torch.autograd.grad((ref[0] * w_NH).float().sum(), params),
        torch.autograd.grad((got[0] * w_NH).float().sum(), params),
        strict=True,
    ):
        assert (g.float() - r.float()).norm() < 0.05 * r.float().norm()


def test_one_token_completions_and_one_row_per_prompt(tok):
    model = model_for(tok, "llama", seed=2).eval()
    b = rollouts(model, tok, max_new_tokens=1)  # nothing after the prompt is fed
    assert_same_hidden_and_gradients(model, b)
    b = rollouts(model, tok, group=1)
    b = b.slice(0, 3)  # three different prompts: nothing to share, the plain forward runs
    args = (b.tokens_BT, b.attention_mask_BT, b.completion_mask_BT, b.prompt_len)
    assert shared_prompt_hidden(model, *args) is None


def test_lora_adapters_get_the_same_gradients(tok):
    model = add_lora(
        model_for(tok, "qwen3", seed=3), rank=4, alpha=8.0, target_modules="all-linear"
    )
    with torch.no_grad():  # lora_B starts at zero: make the adapters change the output
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3, generator=torch.Generator().manual_seed(len(name)))
    model.eval()
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    assert lora and all(p.requires_grad for p in lora)
    assert_same_hidden_and_gradients(model, rollouts(model, tok, seed=4), lora)


def test_the_plain_forward_runs_where_sharing_would_not_reproduce_it(tok):
    from transformers import GPT2Config, GPT2LMHeadModel

    model = model_for(tok, "llama", seed=5).eval()
    b = rollouts(model, tok)
    mask, Lp = b.attention_mask_BT, b.prompt_len
    assert shares_prompts(model, mask, Lp)
    gap = mask.clone()
    gap[0, Lp] = 0  # a hole inside a completion: positions would differ
    assert not shares_prompts(model, gap, Lp)
    handle = model.model.layers[0].register_forward_hook(lambda *a: None)
    assert not shares_prompts(model, mask, Lp)  # the layer's forward would be bypassed
    handle.remove()
    model.config.attention_dropout = 0.1
    assert shares_prompts(model, mask, Lp)  # eval mode: no dropout
    model.train()
    assert not shares_prompts(model, mask, Lp)
    model.config.attention_dropout = 0.0
    assert shares_prompts(model, mask, Lp)
    import peft

    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], lora_dropout=0.1)
    lora = peft.get_peft_model(model_for(tok, "llama", seed=5), config)
    assert shares_prompts(lora.eval(), mask, Lp)
    assert not shares_prompts(lora.train(), mask, Lp)  # LoRA dropout draws per row
    model.eval()
    model.gradient_checkpointing_enable()  # recomputed layers: the plain forward's business
    assert not shares_prompts(model, mask, Lp)
    cfg = GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=1, n_head=2, n_positions=64)
    assert not shares_prompts(GPT2LMHeadModel(cfg), mask, Lp)


def test_the_fused_loss_is_the_same_through_the_shared_prompts(tok):
    from opd.fast.heads import fused_token_loss

    model = model_for(tok, "llama", seed=6).eval()
    b = rollouts(model, tok, seed=7)
    args = (model, b.tokens_BT, b.attention_mask_BT, b.completion_mask_BT, len(tok))

    def chunk_loss(lp_n, sl):
        return -(lp_n * torch.linspace(-1, 1, lp_n.shape[0])).sum()

    def loss_and_grads(hidden):
        loss, lp_N, _ = fused_token_loss(*args, chunk_loss, 7, hidden)
        return loss, lp_N, torch.autograd.grad(loss, list(model.parameters()))

    l1, lp1, g1 = loss_and_grads(shared_prompt_hidden(*args[:4], b.prompt_len))
    l2, lp2, g2 = loss_and_grads(None)
    assert torch.allclose(l1, l2, atol=1e-5) and torch.allclose(lp1, lp2, atol=1e-5)
    for a, c in zip(g1, g2, strict=True):
        assert torch.allclose(a, c, atol=1e-5 * max(1.0, c.abs().max().item()))


def test_opd_distill_trains_through_the_shared_prompts(models, prompts_file, tmp_path, monkeypatch):
    import opd.losses as losses
    from opd.config import build_config
    from opd.train import distill

    shared = []  # per call: whether rows shared prompts (the plain forward ran otherwise)
    real = losses.shared_prompt_hidden

    def spy(*args):
        out = real(*args)
        shared.append(out is not None)
        return out

    monkeypatch.setattr(losses, "shared_prompt_hidden", spy)
    overrides = {
        "model.student": str(models["student"]),
        "model.teacher": str(models["teacher"]),
        "data.prompts": str(prompts_file),
        "run.out": str(tmp_path / "run"),
        "run.steps": 2,
        "data.batch_prompts": 4,
        "sampling.group_size": 2,
        "sampling.max_new_tokens": 6,
        "run.preflight": False,
    }
    distill(build_config(None, overrides, []))
    assert shared == [True, True]  # one micro-batch a step
    shared.clear()
    overrides |= {"sampling.group_size": 1, "run.out": str(tmp_path / "one")}
    distill(build_config(None, overrides, []))
    assert shared == [False, False]  # four different prompts share nothing: the plain forward
    shared.clear()
    overrides |= {"sampling.group_size": 2, "run.out": str(tmp_path / "plain")}
    overrides |= {"run.fast_paths": False}
    distill(build_config(None, overrides, []))
    assert shared == []  # run.fast_paths=false: the plain forward, not even asked
