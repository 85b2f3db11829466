"""Log-prob alignment: the pitfalls that bit every peer (off-by-one, left padding, vocab padding,
sampler vs trainer, pad == eos, NaN through padding)."""

import pytest
import torch

from opd.data import Prompt, pack
from opd.draw import inverse_cdf_sample, sample_token
from opd.logprobs import completion_logprobs
from opd.models import load_model, load_tokenizer
from opd.objectives import kl_advantages, policy_gradient_loss
from opd.samplers.hf import HFSampler
from opd.teachers.local import LocalTeacher

RAGGED = [("ab=", "ba"), ("abcdefg=", "gfedcba"), ("c=", "c"), ("hijab=", "bajih")]


def as_prompts(ids_list):
    return [Prompt(ids=ids, row={}, where="test") for ids in ids_list]


def encode(tok, rows):
    return (
        [tok(p)["input_ids"] for p, _ in rows],
        [tok(c, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for _, c in rows],
    )


def reference_logprobs(model, prompt, completion, vocab):
    """One sequence, no padding at all, plain full-vocabulary log_softmax."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, :, :vocab]
    lp = torch.log_softmax(logits.float(), -1)
    return torch.tensor([lp[len(prompt) - 1 + i, t].item() for i, t in enumerate(completion)])


@pytest.mark.parametrize("name", ["teacher", "qwen3", "padded"])
def test_batched_left_padded_scoring_equals_one_at_a_time(models, tok, name):
    model = load_model(str(models[name]))
    prompts, completions = encode(tok, RAGGED)
    tokens, attn, mask, plen = pack(prompts, completions, tok.pad_token_id)
    with torch.no_grad():
        lp = completion_logprobs(model, tokens, attn, plen, len(tok))
    for b, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        ref = reference_logprobs(model, p, c, len(tok))
        assert torch.allclose(lp[b][mask[b]], ref, atol=1e-5), name
        assert mask[b].sum() == len(c)


def test_padded_vocab_rows_take_no_mass(models, tok):
    model = load_model(str(models["padded"]))
    assert model.get_output_embeddings().weight.shape[0] == len(tok) + 13
    with torch.no_grad():  # make the padding rows dominate if they were not cut
        model.get_output_embeddings().weight[len(tok) :] = 50.0
    prompts, completions = encode(tok, RAGGED)
    tokens, attn, mask, plen = pack(prompts, completions, tok.pad_token_id)
    with torch.no_grad():
        lp = completion_logprobs(model, tokens, attn, plen, len(tok))
        logits = model(input_ids=tokens, attention_mask=attn).logits[..., : len(tok)]
    assert torch.isfinite(lp).all() and (lp[mask] > -20).all()
    # the cut distribution is normalised over the tokenizer's vocabulary
    assert torch.allclose(
        torch.logsumexp(torch.log_softmax(logits, -1), -1), torch.zeros(1), atol=1e-5
    )


@pytest.mark.parametrize("name", ["student", "qwen3"])
def test_sampler_logprobs_equal_trainer_logprobs(models, tok, name):
    model = load_model(str(models[name]))
    sampler = HFSampler(model, tok.pad_token_id, [tok.eos_token_id], len(tok), max_new_tokens=12)
    prompts = [tok(w)["input_ids"] for w in ("ab=", "abcdefgh=", "c=")]
    batch = sampler.sample(as_prompts(prompts), 3, torch.Generator().manual_seed(0))
    assert batch.num_rows == 9 and batch.num_completion_tokens > 9
    lp = completion_logprobs(
        model, batch.tokens_BT, batch.attention_mask_BT, batch.prompt_len, len(tok)
    )
    m = batch.completion_mask_BT
    ratio = torch.exp(lp[m] - batch.sampler_lp_BT[m])
    assert torch.allclose(ratio, torch.ones_like(ratio), atol=1e-5)
    # completions stop at EOS: nothing is sampled after it
    for b in range(batch.num_rows):
        toks = batch.tokens_BT[b][m[b]].tolist()
        assert tok.eos_token_id not in toks[:-1]


def test_teacher_identical_to_student_gives_zero_kl(models, tok):
    model = load_model(str(models["student"]))
    sampler = HFSampler(model, tok.pad_token_id, [tok.eos_token_id], len(tok), max_new_tokens=10)
    batch = sampler.sample(
        as_prompts([tok(w)["input_ids"] for w in ("abc=", "de=")]),
        4,
        torch.Generator().manual_seed(1),
    )
    teacher_lp = LocalTeacher(load_model(str(models["student"])), len(tok)).score(batch)
    m = batch.completion_mask_BT
    kl = (batch.sampler_lp_BT - teacher_lp)[m]
    assert kl.abs().max() < 1e-5
    adv = kl_advantages(batch.sampler_lp_BT, teacher_lp, m, 1.0)
    assert adv.abs().max() < 1e-5


def test_pad_equal_to_eos_keeps_eos_in_the_loss(models):
    tok = load_tokenizer(str(models["student"]))
    tok.pad_token = tok.eos_token  # the pitfall: pad id == eos id
    model = load_model(str(models["student"]))
    sampler = HFSampler(model, tok.pad_token_id, [tok.eos_token_id], len(tok), max_new_tokens=30)
    batch = sampler.sample(
        as_prompts([tok("ab=")["input_ids"]]), 16, torch.Generator().manual_seed(2)
    )
    m = batch.completion_mask_BT
    ended = [b for b in range(batch.num_rows) if batch.tokens_BT[b][m[b]][-1] == tok.eos_token_id]
    assert ended, "expected some completions to end with EOS"
    assert any(m[b].sum() < m.shape[1] - batch.prompt_len for b in ended)  # some were right-padded
    for b in ended:
        last = m[b].nonzero().max()
        assert batch.tokens_BT[b, last] == tok.eos_token_id and batch.sampler_lp_BT[b, last] < 0


def test_finite_gradients_with_a_ragged_left_padded_batch(models, tok):
    model = load_model(str(models["qwen3"]))
    prompts, completions = encode(tok, RAGGED)
    tokens, attn, mask, plen = pack(prompts, completions, tok.pad_token_id)
    lp = completion_logprobs(model, tokens, attn, plen, len(tok))
    adv = torch.randn(lp.shape)
    loss, _ = policy_gradient_loss(lp, lp.detach(), adv, mask, int(mask.sum()))
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_sample_token_topk_topp_logprobs_are_renormalised():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(200):
        t, lp = sample_token(logits, g, top_k=2)
        seen.add(t.item())
        expect = {0: 0.5 / 0.8, 1: 0.3 / 0.8}[t.item()]
        assert lp.exp().item() == pytest.approx(expect, rel=1e-5)
    assert seen == {0, 1}
    for _ in range(200):
        t, lp = sample_token(logits, g, top_p=0.7)  # keeps 0.5 and 0.3 (0.5 < 0.7)
        assert t.item() in (0, 1)
        assert lp.exp().item() == pytest.approx({0: 0.5 / 0.8, 1: 0.3 / 0.8}[t.item()], rel=1e-5)
    t, lp = sample_token(logits, g, temperature=0)
    assert t.item() == 0 and lp.exp().item() == pytest.approx(0.5)
    t, lp = sample_token(logits, g, temperature=0.5)
    p = torch.softmax(logits[0] / 0.5, -1)
    assert lp.exp().item() == pytest.approx(p[t.item()].item(), rel=1e-5)


@pytest.mark.parametrize("block", [1024, 3, 2])  # one level; two levels with a short last block
def test_inverse_cdf_sampling_follows_the_distribution_and_skips_masked_tokens(block):
    probs = torch.tensor([0.0, 0.1, 0.0, 0.25, 0.05, 0.6, 0.0])  # zeros first, between, last
    p_BV = (probs * 3.0).expand(50_000, -1)  # unnormalised
    token_B, mass_B = inverse_cdf_sample(p_BV, torch.Generator().manual_seed(0), block=block)
    assert torch.allclose(mass_B, torch.full((50_000,), 3.0, dtype=torch.float64))
    counts = torch.bincount(token_B, minlength=len(probs))
    assert counts[probs == 0].sum() == 0
    live = probs > 0
    expected = probs[live].double() * 50_000
    chi2 = ((counts[live] - expected) ** 2 / expected).sum()
    assert chi2 < 16.27  # chi-square, 3 degrees of freedom: exceeded by chance with p = 0.001


def test_inverse_cdf_sampling_over_a_wide_vocabulary():
    # every row near one-hot at a different id, in full blocks and in the short last block
    logits_BV = torch.full((64, 32_000), -30.0)
    target_B = torch.randperm(32_000, generator=torch.Generator().manual_seed(1))[:64]
    target_B[:4] = torch.tensor([0, 1023, 31_743, 31_999])  # block edges; 31_744+ is the tail
    logits_BV[torch.arange(64), target_B] = 30.0
    token_B, _ = inverse_cdf_sample(torch.softmax(logits_BV, -1), torch.Generator())
    assert torch.equal(token_B, target_B)
    # a spread distribution: the same draws as one cumulative sum over the whole row
    p_BV = torch.softmax(torch.randn(64, 32_000, generator=torch.Generator().manual_seed(2)), -1)
    token_B, _ = inverse_cdf_sample(p_BV, torch.Generator().manual_seed(3))
    u_B1 = torch.rand((64, 1), generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    cdf_BV = p_BV.double().cumsum(-1)
    flat_B = torch.searchsorted(cdf_BV, u_B1 * cdf_BV[:, -1:], right=True).squeeze(-1)
    assert torch.equal(token_B, flat_B)


def test_sampler_first_token_distribution_matches_the_model(models, tok):
    """Temperature-1 samples follow the model's own next-token distribution (chi-square)."""
    model = load_model(str(models["teacher"]))
    prompt = tok("abc=")["input_ids"]
    sampler = HFSampler(model, tok.pad_token_id, [tok.eos_token_id], len(tok), max_new_tokens=1)
    batch = sampler.sample(as_prompts([prompt]), 4000, torch.Generator().manual_seed(3))
    with torch.no_grad():
        probs = torch.softmax(model(input_ids=torch.tensor([prompt])).logits[0, -1, : len(tok)], -1)
    counts = torch.bincount(batch.tokens_BT[:, -1], minlength=len(tok)).double()
    expected = probs.double() * 4000
    big = expected > 5
    rest_obs, rest_exp = counts[~big].sum(), expected[~big].sum()
    chi2 = (((counts[big] - expected[big]) ** 2) / expected[big]).sum()
    if rest_exp > 5:
        chi2 += (rest_obs - rest_exp) ** 2 / rest_exp
    dof = int(big.sum()) + int(rest_exp > 5) - 1
    assert chi2 < dof + 5 * (2 * max(dof, 1)) ** 0.5 + 10  # far beyond chance only if biased
