"""Heads whose logits are mapped after the LM head (Gemma-2's final-logit soft-capping, Cohere's
logit_scale, Granite's logits_scaling): the chunked paths (teacher scoring, divergence losses,
the fused token loss) give the model's own forward's numbers, and a run completes."""

from __future__ import annotations

import copy
import json
import math
from types import SimpleNamespace

import pytest
import torch

from opd import tiny
from opd.config import build_config
from opd.divergences import divergence_loss_chunked, teacher_topk
from opd.errors import OpdError
from opd.fast.heads import fused_token_loss, logprobs_at, plain_head
from opd.logprobs import completion_hidden, completion_logits, completion_logprobs
from opd.models import IDENTITY, PostHead, check_plain_head, post_head
from opd.objectives import policy_gradient_loss
from opd.teachers.local import LocalTeacher
from opd.train import distill

from .test_divergences import (  # one_thread: its autouse fixture applies here too
    RAGGED,
    TOPK,
    build_rollouts,
    grads_of,
    one_thread,  # noqa: F401
    unchunked,
)

ARCHS = ("gemma2", "cohere", "granite")
# Each model's own field, sized so that it changes the log-probs (see test_the_map_bites).
POST = {
    "gemma2": {"final_logit_softcapping": 2.0},
    "cohere": {"logit_scale": 2.5},
    "granite": {"logits_scaling": 0.4},
}
HEAD_SCALE = {"gemma2": 15.0, "cohere": 6.0, "granite": 6.0}  # the scaling above makes up the rest


@pytest.fixture(scope="module")
def tok():
    return tiny.char_tokenizer()


@pytest.fixture(scope="module")
def rollouts(tok):
    return build_rollouts(tok, RAGGED)


def make(tok, arch: str, seed: int, vocab_pad: int = 0, layers: int = 1):
    """A tiny causal LM of the family, its LM head scaled up so the model's logits have a std of
    ~2 and reach ~+-10 (random initial ones are ~0.1): Gemma's cap of 2 bends most of them,
    flattening some. (Larger logits make larger gradients, whose float32 rounding then passes
    1e-5 in the plain forward itself.)"""
    from transformers import AutoModelForCausalLM, CohereConfig, Gemma2Config, GraniteConfig

    common = dict(
        vocab_size=len(tok) + vocab_pad,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        **POST[arch],
    )
    if arch == "gemma2":  # tied embeddings, as Gemma ships
        config = Gemma2Config(head_dim=8, sliding_window=4, **common)
    elif arch == "cohere":
        config = CohereConfig(tie_word_embeddings=False, **common)
    else:
        config = GraniteConfig(tie_word_embeddings=False, **common)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(HEAD_SCALE[arch])
    return model


# --- the map itself ------------------------------------------------------------------------


def test_post_head_is_read_per_model_family():
    def cfg(model_type, **fields):
        return SimpleNamespace(model_type=model_type, **fields)

    assert post_head(cfg("gemma2", final_logit_softcapping=30.0)) == PostHead(cap=30.0)
    # a cap of 1 is tanh, not the identity
    assert post_head(cfg("gemma2", final_logit_softcapping=1.0)) == PostHead(cap=1.0)
    assert post_head(cfg("gemma2", final_logit_softcapping=None)) is IDENTITY
    assert post_head(cfg("cohere", logit_scale=0.0625)) == PostHead(mul=0.0625)
    assert post_head(cfg("granite", logits_scaling=16)) == PostHead(div=16.0)
    assert post_head(cfg("granite", logits_scaling=1.0)).identity
    assert post_head(cfg("hyperclovax", logits_scaling=4.0)) == PostHead(mul=4.0)  # not divided
    assert post_head(cfg("llama")) is IDENTITY
    # a field on a model type whose forward opd does not know to use it: no fast path, refused
    for config in (cfg("llama", final_logit_softcapping=30.0), cfg("mpt", logit_scale=2.0)):
        assert post_head(config) is None
        with pytest.raises(OpdError, match="does not know"):
            check_plain_head(SimpleNamespace(config=config))
    assert post_head(cfg("gemma2", final_logit_softcapping=30.0, logit_scale=2.0)) is None


def test_post_head_matches_each_models_forward_on_its_head_output(tok, rollouts):
    for arch in ARCHS:
        model = make(tok, arch, seed=0)
        post = post_head(model.config)
        assert not post.identity and plain_head(model) is model.get_output_embeddings()
        P = rollouts.prompt_len
        with torch.no_grad():
            ref_BCV = completion_logits(model, rollouts.tokens_BT, rollouts.attention_mask_BT, P)
            h_NH, rows_N, cols_N, _ = completion_hidden(
                model, rollouts.tokens_BT, rollouts.attention_mask_BT, rollouts.completion_mask_BT
            )
            got_NV = post(model.get_output_embeddings()(h_NH))
            inplace_NV = post.apply_(model.get_output_embeddings()(h_NH).clone())
        torch.testing.assert_close(got_NV, ref_BCV[rows_N, cols_N - P], atol=1e-5, rtol=0)
        assert torch.equal(got_NV, inplace_NV), arch


def test_the_map_bites(tok, rollouts):
    """The fields above change the log-probs by far more than the tolerances below."""
    ro = rollouts
    for arch in ARCHS:
        model = make(tok, arch, seed=0)
        with torch.inference_mode():
            h_NH, rows_N, cols_N, _ = completion_hidden(
                model, ro.tokens_BT, ro.attention_mask_BT, ro.completion_mask_BT
            )
            head = plain_head(model)
            args = (head, h_NH, rows_N, cols_N, ro.tokens_BT, len(tok), 3)
            raw_BT, mapped_BT = logprobs_at(*args), logprobs_at(*args, post_head(model.config))
        assert (raw_BT - mapped_BT).abs().max() > 0.3, arch


# --- (a) teacher log-probs and logits -----------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_local_teacher_scores_and_logits_equal_the_models_forward(tok, rollouts, arch):
    model, ro, V = make(tok, arch, seed=0, vocab_pad=5), rollouts, len(tok)
    mask_BT, P = ro.completion_mask_BT, ro.prompt_len
    rows_N, cols_N = mask_BT.nonzero(as_tuple=True)
    with torch.inference_mode():
        ref_BT = completion_logprobs(model, ro.tokens_BT, ro.attention_mask_BT, P, V)
        ref_BCV = completion_logits(model, ro.tokens_BT, ro.attention_mask_BT, P)
    assert plain_head(model) is not None  # the chunked head scores it, not the plain forward
    for fast in (True, False):
        teacher = LocalTeacher(model, V, chunk=3, fast=fast)
        lp_BT = teacher.score(ro)
        torch.testing.assert_close(lp_BT[mask_BT], ref_BT[mask_BT], atol=1e-5, rtol=0)
        assert (lp_BT[~mask_BT] == 0).all()
    logits_fn, lp_BT = LocalTeacher(model, V, chunk=3).logits(ro)
    torch.testing.assert_close(lp_BT[mask_BT], ref_BT[mask_BT], atol=1e-5, rtol=0)
    got_NV = logits_fn(rows_N, cols_N)
    assert got_NV.shape == (rows_N.numel(), V)
    torch.testing.assert_close(got_NV, ref_BCV[rows_N, cols_N - P, :V], atol=1e-5, rtol=0)


# --- (b) the chunked divergence losses ----------------------------------------------------


def chunked(student, teacher, ro, kind, vocab, chunk):
    student.zero_grad(set_to_none=True)
    fn = LocalTeacher(teacher, vocab, chunk=2).logits(ro)[0]
    if kind == "topk_reverse_kl":
        fn = (lambda f: lambda rows, cols: teacher_topk(f(rows, cols), TOPK))(fn)
    loss, _ = divergence_loss_chunked(
        student, ro, fn, kind, vocab, ro.num_completion_tokens, chunk_tokens=chunk
    )
    return loss, grads_of(student)


@pytest.mark.parametrize("kind", ["reverse_kl", "jsd", "topk_reverse_kl"])
@pytest.mark.parametrize("arch", ARCHS)
def test_chunked_divergence_equals_the_models_forward(tok, rollouts, arch, kind):
    student, teacher = make(tok, arch, seed=1), make(tok, arch, seed=2)
    ref_loss, ref_grads = unchunked(student, teacher, rollouts, kind, 0.5, len(tok))
    assert ref_loss > 1e-2
    loss, grads = chunked(student, teacher, rollouts, kind, len(tok), chunk=3)
    assert math.isclose(loss, ref_loss, rel_tol=1e-5, abs_tol=1e-5)
    assert grads.keys() == ref_grads.keys()
    for name, g in grads.items():
        torch.testing.assert_close(
            g, ref_grads[name], atol=1e-5, rtol=1e-5, msg=lambda m, name=name: f"{name}: {m}"
        )


# --- (c) the fused sampled-token loss -----------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_fused_token_loss_equals_the_plain_path(tok, rollouts, arch):
    ro, V = rollouts, len(tok)
    mask_BT, P = ro.completion_mask_BT, ro.prompt_len
    g = torch.Generator().manual_seed(0)
    sampler_lp_BT = -torch.rand(mask_BT.shape, generator=g) * 3
    adv_BT = torch.randn(mask_BT.shape, generator=g)
    n_tokens = int(mask_BT.sum()) + 3
    plain = make(tok, arch, seed=1, vocab_pad=3, layers=2)
    fused = copy.deepcopy(plain)

    lp_BT = completion_logprobs(plain, ro.tokens_BT, ro.attention_mask_BT, P, V)
    ref = policy_gradient_loss(lp_BT, sampler_lp_BT, adv_BT, mask_BT, n_tokens, 0.2)[0]
    ref.backward()
    s_lp_N, adv_N = sampler_lp_BT[mask_BT], adv_BT[mask_BT]

    def chunk_loss(lp_n, sl):
        ones = torch.ones_like(lp_n, dtype=torch.bool)
        return policy_gradient_loss(lp_n, s_lp_N[sl], adv_N[sl], ones, n_tokens, 0.2)[0]

    assert plain_head(fused) is not None
    loss, lp_N, _ = fused_token_loss(
        fused, ro.tokens_BT, ro.attention_mask_BT, mask_BT, V, chunk_loss, 3
    )
    loss.backward()
    assert math.isclose(loss.item(), ref.item(), rel_tol=1e-5, abs_tol=1e-6)
    torch.testing.assert_close(lp_N, lp_BT[mask_BT].detach(), atol=1e-5, rtol=0)
    ref_grads, grads = grads_of(plain), grads_of(fused)
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(
            grad, ref_grads[name], atol=1e-5, rtol=1e-5, msg=lambda m, name=name: f"{name}: {m}"
        )


# --- (d) a run ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gemma_folders(tok, tmp_path_factory):
    root = tmp_path_factory.mktemp("gemma2")
    return {
        name: tiny.save(make(tok, "gemma2", seed=seed, layers=2), tok, root / name)
        for name, seed in (("teacher", 0), ("student", 1))
    }


@pytest.mark.parametrize("loss", ["full", "topk", "jsd", "sampled"])
def test_distill_with_a_soft_capped_teacher_and_student(
    gemma_folders, prompts_file, tmp_path, loss
):
    out = tmp_path / "run"
    flags = {
        "model.student": str(gemma_folders["student"]),
        "model.teacher": str(gemma_folders["teacher"]),
        "data.prompts": str(prompts_file),
        "run.out": str(out),
        "run.steps": 2,
        "data.batch_prompts": 2,
        "sampling.group_size": 2,
        "sampling.max_new_tokens": 4,
        "optim.lr": 1e-3,
        "run.preflight": False,
        "objective.loss": loss,
    }
    final = distill(build_config(None, flags, []))
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and (final / "model.safetensors").is_file()
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["teacher/kl"]) for r in rows)
