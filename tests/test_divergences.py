"""Divergence losses: the pure functions against hand-built references and TRL, and the chunked
driver against a plain full-logits implementation on tiny models."""

import dataclasses
import math

import pytest
import torch

from opd import tiny
from opd.data import pack
from opd.divergences import (
    divergence,
    divergence_loss_chunked,
    full_reverse_kl,
    gather_topk_fn,
    generalized_jsd,
    teacher_topk,
    topk_reverse_kl,
)
from opd.errors import OpdError
from opd.teachers.local import LocalTeacher
from opd.types import Rollouts, position_ids

V = 11


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tensors here are tiny: a second thread only adds OpenMP barriers (5x slower on a busy box)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def random_logits(n=6, v=V, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, v, generator=g) * scale, torch.randn(n, v, generator=g) * scale


# --- pure functions ---------------------------------------------------------------------------


def test_full_reverse_kl_by_hand():
    s, t = torch.tensor([[0.0, math.log(3.0)]]), torch.tensor([[0.0, 0.0]])
    # p_s = (1/4, 3/4), p_t = (1/2, 1/2)
    expected = 0.25 * math.log(0.5) + 0.75 * math.log(1.5)
    assert torch.allclose(full_reverse_kl(s, t), torch.tensor([expected]), atol=1e-6)
    assert torch.allclose(full_reverse_kl(s, s), torch.zeros(1), atol=1e-7)


def test_generalized_jsd_end_points_and_mixture():
    s, t = random_logits()
    s_lp, t_lp = torch.log_softmax(s, -1).double(), torch.log_softmax(t, -1).double()
    ps, pt = s_lp.exp(), t_lp.exp()
    assert torch.allclose(generalized_jsd(s, t, 1.0), full_reverse_kl(s, t))
    assert torch.allclose(generalized_jsd(s, t, 0.0), full_reverse_kl(t, s))
    m = 0.3 * pt + 0.7 * ps
    expected = 0.3 * (pt * (pt / m).log()).sum(-1) + 0.7 * (ps * (ps / m).log()).sum(-1)
    assert torch.allclose(generalized_jsd(s, t, 0.3).double(), expected, atol=1e-6)
    with pytest.raises(ValueError):
        generalized_jsd(s, t, 1.5)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0, 0.1])
def test_generalized_jsd_matches_trl(beta, monkeypatch):
    pytest.importorskip("trl")  # listed in the [test] extra, so this only skips outside it
    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")
    try:
        from trl.experimental.gkd import GKDTrainer
    except ImportError:  # older trl releases kept GKD at the top level
        from trl import GKDTrainer
    B, T = 3, 5
    s, t = random_logits(B * T, 17, seed=1)
    s_BTV, t_BTV = s.view(B, T, 17), t.view(B, T, 17)
    ours_BT = generalized_jsd(s, t, beta).view(B, T)
    theirs_BTV = GKDTrainer.generalized_jsd_loss(s_BTV, t_BTV, beta=beta, reduction="none")
    assert torch.allclose(ours_BT, theirs_BTV.sum(-1), atol=1e-5)

    mask_BT = torch.rand(B, T, generator=torch.Generator().manual_seed(2)) > 0.4
    labels_BT = torch.where(mask_BT, 5, -100)
    s_BTV = s_BTV.clone().requires_grad_()
    theirs = GKDTrainer.generalized_jsd_loss(s_BTV, t_BTV, labels=labels_BT, beta=beta)
    (grad_theirs,) = torch.autograd.grad(theirs, s_BTV)
    div_BT = generalized_jsd(s_BTV.view(-1, 17), t, beta).view(B, T)
    ours = torch.where(mask_BT, div_BT, 0.0).sum() / mask_BT.sum()
    (grad_ours,) = torch.autograd.grad(ours, s_BTV)
    assert torch.allclose(ours, theirs, atol=1e-5)
    assert torch.allclose(grad_ours, grad_theirs, atol=1e-5)


def bucket_reference(s_logits, ids, t_lp):
    """One row at a time in float64: (K + 1)-bucket distributions, then plain KL."""
    out = []
    for row_s, row_ids, row_t in zip(s_logits.double(), ids.tolist(), t_lp.double(), strict=True):
        ps = torch.softmax(row_s, -1)
        seen, p, q = set(), [], []
        for i, lp in zip(row_ids, row_t.tolist(), strict=True):
            if 0 <= i < len(ps) and i not in seen:
                seen.add(i)
                p.append(ps[i])
                q.append(math.exp(lp))
        p.append(1 - sum(p))
        q.append(max(1 - sum(q), 1e-8))
        out.append(sum(a * (a.log() - math.log(b)) for a, b in zip(p, q, strict=True) if a > 0))
    return torch.stack(out)


def test_topk_reverse_kl_matches_bucket_reference_and_is_bounded():
    s, t = random_logits(8)
    ids, lp = teacher_topk(t, 4)
    got = topk_reverse_kl(s, ids, lp)
    assert torch.allclose(got.double(), bucket_reference(s, ids, lp), atol=1e-5)
    full = full_reverse_kl(s, t)
    assert (got >= -1e-6).all() and (got <= full + 1e-5).all()


def test_topk_covering_the_vocab_equals_full_reverse_kl():
    s, t = random_logits(8)
    ids, lp = teacher_topk(t, V)
    assert torch.allclose(topk_reverse_kl(s, ids, lp), full_reverse_kl(s, t), atol=1e-5)
    # shuffled order, a duplicate and padding change nothing
    perm = torch.randperm(V, generator=torch.Generator().manual_seed(0))
    ids2 = torch.cat([ids[:, perm], ids[:, :1], torch.full((8, 2), -1)], 1)
    lp2 = torch.cat([lp[:, perm], lp[:, :1], torch.full((8, 2), -math.inf)], 1)
    s = s.clone().requires_grad_()
    (g,) = torch.autograd.grad(topk_reverse_kl(s, ids2, lp2).sum(), s)
    (g_full,) = torch.autograd.grad(full_reverse_kl(s, t).sum(), s)
    assert torch.allclose(topk_reverse_kl(s, ids2, lp2), full_reverse_kl(s, t), atol=1e-5)
    assert torch.allclose(g, g_full, atol=1e-5)


def test_topk_duplicates_and_padding_are_ignored_without_nan():
    s, t = random_logits(5)
    ids, lp = teacher_topk(t, 3)
    s = s.clone().requires_grad_()
    (g_ref,) = torch.autograd.grad(topk_reverse_kl(s, ids, lp).sum(), s)
    # row-varying K: the sampled token repeated on some rows, padding on the others
    pos = torch.tensor([[0, -1], [-1, -1], [1, 1], [2, -1], [-1, -1]])  # entries to repeat
    extra_ids = torch.where(pos >= 0, ids.gather(1, pos.clamp(min=0)), -1)
    extra_lp = torch.where(pos >= 0, lp.gather(1, pos.clamp(min=0)), -math.inf)
    ids2, lp2 = torch.cat([ids, extra_ids], 1), torch.cat([lp, extra_lp], 1)
    loss = topk_reverse_kl(s, ids2, lp2)
    (g,) = torch.autograd.grad(loss.sum(), s)
    assert torch.isfinite(loss).all() and torch.isfinite(g).all()
    assert torch.allclose(loss, topk_reverse_kl(s, ids, lp), atol=1e-6)
    assert torch.allclose(g, g_ref, atol=1e-6)


def test_topk_extreme_teacher_values_stay_finite():
    s, _ = random_logits(3)
    s = s.clone().requires_grad_()
    ids = torch.tensor([[0, 1], [2, -1], [3, 4]])
    # a hard-masked (-inf) teacher token, and probabilities summing past 1 by rounding
    lp = torch.tensor([[-math.inf, -0.1], [0.0, -math.inf], [math.log(0.6), math.log(0.4) + 1e-6]])
    loss = topk_reverse_kl(s, ids, lp)
    (g,) = torch.autograd.grad(loss.sum(), s)
    assert torch.isfinite(loss).all() and torch.isfinite(g).all()


@pytest.mark.parametrize("beta", [1.0, 0.5, 0.0])
def test_masked_student_logits_give_finite_loss_and_gradient(beta):
    """A student logit of -inf (a masked token, e.g. a banned EOS) must not turn into NaN: the
    token adds nothing, so the loss equals the loss over the other tokens."""
    s, t = random_logits(4)
    s_masked = s.clone()
    s_masked[:, 3] = -math.inf
    s_masked.requires_grad_()
    loss = generalized_jsd(s_masked, t, beta)
    (g,) = torch.autograd.grad(loss.sum(), s_masked)
    assert torch.isfinite(g).all() and (g[:, 3] == 0).all()
    if beta == 1.0:  # reverse KL: the masked token is outside the student's support
        keep = [i for i in range(V) if i != 3]
        # the teacher's own distribution is over all V tokens: its log-probs, restricted
        t_lp = torch.log_softmax(t, -1)[:, keep]
        s_lp = torch.log_softmax(s[:, keep], -1)
        assert torch.allclose(loss, (s_lp.exp() * (s_lp - t_lp)).sum(-1), atol=1e-6)
    else:  # forward KL and JSD: the teacher puts mass where the student has none: large, finite
        assert torch.isfinite(loss).all()


def test_teacher_equal_to_student_gives_zero():
    s, _ = random_logits()
    for kind, teacher_out in [
        ("reverse_kl", s),
        ("jsd", s),
        ("topk_reverse_kl", teacher_topk(s, 3)),
    ]:
        assert divergence(kind, s, teacher_out).abs().max() < 1e-6, kind


# --- chunked driver on tiny models ------------------------------------------------------------

RAGGED = [("ab=", "ba"), ("abcdefg=", "gfedcba"), ("c=", "c"), ("hijab=", "bajih")]
CASES = [("reverse_kl", 0.5), ("jsd", 0.5), ("jsd", 0.0), ("topk_reverse_kl", 0.5)]
TOPK = 5


def build_rollouts(tok, rows):
    """Left-padded prompts, right-padded completions (EOS added; None = nothing sampled)."""
    prompts = [tok(p)["input_ids"] for p, _ in rows]
    completions = [
        [] if c is None else tok(c, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        for _, c in rows
    ]
    tokens, attn, mask, plen = pack(prompts, completions, tok.pad_token_id)
    return Rollouts(
        tokens_BT=tokens,
        attention_mask_BT=attn,
        completion_mask_BT=mask,
        prompt_len=plen,
        sampler_lp_BT=torch.zeros(tokens.shape),
        prompt_index_B=torch.arange(tokens.shape[0]),
    )


@pytest.fixture(scope="module")
def rollouts(tok):
    return build_rollouts(tok, RAGGED)


def make(tok, seed, vocab_pad=0, arch="llama"):
    return tiny.tiny_model(
        tok, arch=arch, hidden=32, layers=1, vocab_pad=vocab_pad, seed=seed
    ).eval()


def teacher_fn_for(kind, teacher, ro, vocab):
    fn = LocalTeacher(teacher, vocab).logits(ro)[0]
    if kind != "topk_reverse_kl":
        return fn
    return lambda rows, cols: teacher_topk(fn(rows, cols), TOPK)


def chunked(student, teacher, ro, kind, beta, vocab, chunk):
    student.zero_grad(set_to_none=True)
    fn = teacher_fn_for(kind, teacher, ro, vocab)
    loss, stats = divergence_loss_chunked(
        student, ro, fn, kind, vocab, ro.num_completion_tokens, chunk_tokens=chunk, beta=beta
    )
    return loss, grads_of(student), stats


def unchunked(student, teacher, ro, kind, beta, vocab):
    """The straightforward version: full (B, T, V) logits from both models, then backward."""
    student.zero_grad(set_to_none=True)
    P, pos = ro.prompt_len, position_ids(ro.attention_mask_BT)
    inputs = dict(input_ids=ro.tokens_BT, attention_mask=ro.attention_mask_BT, position_ids=pos)
    s_BCV = student(**inputs).logits[:, P - 1 : -1, :vocab]
    with torch.no_grad():
        t_BCV = teacher(**inputs).logits[:, P - 1 : -1, :vocab]
    s_NV, t_NV = s_BCV.reshape(-1, vocab), t_BCV.reshape(-1, vocab)
    teacher_out = teacher_topk(t_NV, TOPK) if kind == "topk_reverse_kl" else t_NV
    div_BC = divergence(kind, s_NV, teacher_out, beta).view(s_BCV.shape[:2])
    mask_BC = ro.completion_mask_BT[:, P:]
    loss = torch.where(mask_BC, div_BC, 0.0).sum() / mask_BC.sum()
    loss.backward()
    return loss.item(), grads_of(student)


def grads_of(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_same_grads(a, b, atol=1e-5):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], atol=atol), name


@pytest.mark.parametrize("kind,beta", CASES)
def test_chunked_equals_unchunked(tok, rollouts, kind, beta):
    student, teacher = make(tok, seed=1), make(tok, seed=2)
    vocab = len(tok)
    ref_loss, ref_grads = unchunked(student, teacher, rollouts, kind, beta, vocab)
    assert ref_loss > 0
    for chunk in (1, 3, 10_000):
        loss, grads, stats = chunked(student, teacher, rollouts, kind, beta, vocab, chunk)
        assert stats["tokens"] == rollouts.num_completion_tokens
        assert math.isclose(loss, ref_loss, abs_tol=1e-6), chunk
        assert_same_grads(grads, ref_grads)


def test_rows_that_share_a_prompt_run_it_once_with_the_same_loss_and_gradients(tok, monkeypatch):
    import opd.divergences as divergences

    calls = []  # per call: whether the rows shared prompts (the plain forward ran otherwise)
    real = divergences.shared_prompt_hidden

    def spy(*args):
        out = real(*args)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(divergences, "shared_prompt_hidden", spy)
    shared = build_rollouts(tok, RAGGED + [("ab=", "abab"), ("c=", None), ("hijab=", "b")])
    for arch in ("llama", "qwen3"):
        student, teacher = make(tok, seed=1, arch=arch), make(tok, seed=2)
        ref_loss, ref_grads = unchunked(student, teacher, shared, "reverse_kl", 0.5, len(tok))
        loss, grads, _ = chunked(student, teacher, shared, "reverse_kl", 0.5, len(tok), 4)
        assert math.isclose(loss, ref_loss, abs_tol=1e-6)
        assert_same_grads(grads, ref_grads)
    assert calls == [True, True]


def test_chunked_qwen3_and_lora(tok, rollouts):
    peft = pytest.importorskip("peft")
    teacher = make(tok, seed=2)
    qwen = make(tok, seed=3, arch="qwen3")
    ref_loss, ref_grads = unchunked(qwen, teacher, rollouts, "reverse_kl", 0.5, len(tok))
    loss, grads, _ = chunked(qwen, teacher, rollouts, "reverse_kl", 0.5, len(tok), 4)
    assert math.isclose(loss, ref_loss, abs_tol=1e-6)
    assert_same_grads(grads, ref_grads)

    cfg = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    lora = peft.get_peft_model(make(tok, seed=1), cfg)
    ref_loss, ref_grads = unchunked(lora, teacher, rollouts, "jsd", 0.5, len(tok))
    loss, grads, _ = chunked(lora, teacher, rollouts, "jsd", 0.5, len(tok), 4)
    assert math.isclose(loss, ref_loss, abs_tol=1e-6)
    assert grads and all("lora_" in n for n in grads)
    assert_same_grads(grads, ref_grads)


@pytest.mark.parametrize("kind,beta", CASES)
def test_teacher_equal_to_student_gives_zero_loss_and_gradient(tok, rollouts, kind, beta):
    student = make(tok, seed=1)
    loss, grads, _ = chunked(student, student, rollouts, kind, beta, len(tok), 3)
    assert abs(loss) < 1e-6
    assert max(g.abs().max().item() for g in grads.values()) < 1e-6


def test_padding_never_contributes(tok, rollouts):
    student, teacher = make(tok, seed=1), make(tok, seed=2)
    loss, grads, _ = chunked(student, teacher, rollouts, "jsd", 0.5, len(tok), 3)
    # a row with nothing sampled rides along
    with_empty = build_rollouts(tok, RAGGED + [("abc=", None)])
    loss1, grads1, _ = chunked(student, teacher, with_empty, "jsd", 0.5, len(tok), 3)
    assert math.isclose(loss, loss1, rel_tol=1e-6)
    assert_same_grads(grads, grads1, atol=1e-6)
    # scribble over every token outside the attention mask, and mark none of it as sampled
    g = torch.Generator().manual_seed(0)
    noise = torch.randint(0, len(tok), rollouts.tokens_BT.shape, generator=g)
    real_BT = rollouts.attention_mask_BT.bool()
    noisy = dataclasses.replace(rollouts, tokens_BT=torch.where(real_BT, rollouts.tokens_BT, noise))
    loss2, grads2, _ = chunked(student, teacher, noisy, "jsd", 0.5, len(tok), 3)
    assert math.isclose(loss, loss2, rel_tol=1e-6)
    assert_same_grads(grads, grads2, atol=1e-6)
    assert all(torch.isfinite(g).all() for g in grads2.values())


def test_padded_vocab_rows_take_no_mass(tok, rollouts):
    vocab = len(tok)
    student, teacher = make(tok, seed=1, vocab_pad=13), make(tok, seed=2, vocab_pad=5)
    ref_loss, ref_grads = unchunked(student, teacher, rollouts, "reverse_kl", 0.5, vocab)
    loss, grads, _ = chunked(student, teacher, rollouts, "reverse_kl", 0.5, vocab, 3)
    assert math.isclose(loss, ref_loss, abs_tol=1e-6)
    assert_same_grads(grads, ref_grads)
    with torch.no_grad():  # make the padding rows dominate if they were not cut
        student.get_output_embeddings().weight[vocab:] = 50.0
        teacher.get_output_embeddings().weight[vocab:] = -50.0
    loss2, grads2, _ = chunked(student, teacher, rollouts, "reverse_kl", 0.5, vocab, 3)
    assert math.isclose(loss, loss2, rel_tol=1e-6)
    assert_same_grads(grads, grads2, atol=1e-6)
    assert (grads2["lm_head.weight"][vocab:] == 0).all()


def test_stored_topk_teacher(tok, rollouts):
    """gather_topk_fn reads (B, T, K) top-k aligned with tokens, padded with -1 / -inf."""
    student, teacher = make(tok, seed=1), make(tok, seed=2)
    vocab, P = len(tok), rollouts.prompt_len
    B, T = rollouts.tokens_BT.shape
    with torch.no_grad():
        logits = teacher(
            input_ids=rollouts.tokens_BT,
            attention_mask=rollouts.attention_mask_BT,
            position_ids=position_ids(rollouts.attention_mask_BT),
        ).logits[:, :-1, :vocab]
    ids_BTK = torch.full((B, T, TOPK + 1), -1)
    lp_BTK = torch.full((B, T, TOPK + 1), -math.inf)
    ids, lp = teacher_topk(logits.reshape(-1, vocab), TOPK)
    ids_BTK[:, 1:, :TOPK], lp_BTK[:, 1:, :TOPK] = ids.view(B, T - 1, -1), lp.view(B, T - 1, -1)
    ref_loss, ref_grads = unchunked(student, teacher, rollouts, "topk_reverse_kl", 0.5, vocab)
    student.zero_grad(set_to_none=True)
    loss, _ = divergence_loss_chunked(
        student,
        rollouts,
        gather_topk_fn(ids_BTK, lp_BTK),
        "topk_reverse_kl",
        vocab,
        rollouts.num_completion_tokens,
        chunk_tokens=3,
    )
    assert P > 1 and math.isclose(loss, ref_loss, abs_tol=1e-6)
    assert_same_grads(grads_of(student), ref_grads)


def test_heads_that_are_not_linear_are_refused(tok, rollouts):
    student = make(tok, seed=1)
    student.config.final_logit_softcapping = 30.0
    with pytest.raises(OpdError, match="final_logit_softcapping"):
        divergence_loss_chunked(student, rollouts, lambda r, c: None, "reverse_kl", len(tok), 1)
    with pytest.raises(ValueError, match="unknown divergence"):
        divergence_loss_chunked(make(tok, seed=1), rollouts, lambda r, c: None, "kl", len(tok), 1)
