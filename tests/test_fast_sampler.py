"""KVCacheSampler: the same rows and log-probs as HFSampler and the trainer, a faster loop.

Checks the sampler log-probs against the trainer's `completion_logprobs` (no off-by-one, left
padding does not shift positions), greedy tokens against HFSampler, the sampled distribution
(chi-square), early stopping with rows dropped mid-decode, top-k/top-p renormalisation, the
fallback to HFSampler and a LoRA-wrapped student, and `opd distill` with either backend.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, MistralConfig, Qwen2Config

from opd import tiny
from opd.config import Config, apply_overrides, validate
from opd.data import Prompt
from opd.errors import OpdError
from opd.fast.decode import KVCacheSampler
from opd.fast.llama import kv_supported
from opd.logprobs import completion_logits, completion_logprobs
from opd.models import add_lora, load_model
from opd.samplers import make_sampler
from opd.samplers.hf import HFSampler

from .test_cli import distill_args

WORDS = ("ab=", "abcdefgh=", "c=", "hijab=")


def as_prompts(tok, words=WORDS):
    return [Prompt(ids=tok(w)["input_ids"], row={}, where="test") for w in words]


def model_for(tok, arch: str, seed: int = 0):
    """Tiny random models: grouped-query attention (4 heads, 2 kv heads) unless named otherwise.

    "llama-mha" has one kv head per head; "llama-tied" shares its input embedding with its LM
    head; "mistral" has 4 query heads per kv head and a head_dim (8) that is not hidden / heads;
    "qwen2" has q/k/v biases and padded embeddings; "qwen3-wide" has heads of 16 for hidden 32
    and 4 heads, as Qwen3-0.6B's are 128 for 1024 and 16 (`tiny_model(head_dim=...)`).
    """
    if arch == "qwen3-wide":
        return tiny.tiny_model(tok, arch="qwen3", hidden=32, layers=2, head_dim=16, seed=seed)
    if arch == "llama-tied":
        return tiny.tiny_model(tok, hidden=32, layers=2, kv_heads=2, seed=seed, tied=True)
    if arch in ("llama", "qwen3", "llama-mha"):
        kv_heads = 4 if arch == "llama-mha" else 2
        arch = arch.removesuffix("-mha")
        return tiny.tiny_model(tok, arch=arch, hidden=32, layers=2, kv_heads=kv_heads, seed=seed)
    common = dict(
        vocab_size=len(tok) + 5,  # padded embedding rows, cut like Qwen's
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    if arch == "qwen2":
        config = Qwen2Config(num_attention_heads=4, num_key_value_heads=2, **common)
    else:
        config = MistralConfig(
            sliding_window=None, num_attention_heads=8, num_key_value_heads=2, head_dim=8, **common
        )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


def kv_sampler(model, tok, max_new_tokens: int, **kw) -> KVCacheSampler:
    return KVCacheSampler(
        model, tok.pad_token_id, [tok.eos_token_id], len(tok), max_new_tokens, **kw
    )


def hf_sampler(model, tok, max_new_tokens: int, **kw) -> HFSampler:
    return HFSampler(model, tok.pad_token_id, [tok.eos_token_id], len(tok), max_new_tokens, **kw)


def assert_matches_trainer(model, tok, batch, atol=1e-5):
    """Sampler log-probs equal the trainer's; nothing after a stop id; padding is pad/0/masked."""
    with torch.no_grad():
        lp_BT = completion_logprobs(
            model, batch.tokens_BT, batch.attention_mask_BT, batch.prompt_len, len(tok)
        )
    m_BT = batch.completion_mask_BT
    assert torch.allclose(lp_BT[m_BT], batch.sampler_lp_BT[m_BT], atol=atol)
    assert (batch.sampler_lp_BT[~m_BT] == 0).all()
    completion_BT = batch.attention_mask_BT[:, batch.prompt_len :].bool()
    assert torch.equal(completion_BT, m_BT[:, batch.prompt_len :])
    assert (batch.tokens_BT[:, batch.prompt_len :][~completion_BT] == tok.pad_token_id).all()
    lengths_B = m_BT.sum(1)
    assert lengths_B.max() == batch.tokens_BT.shape[1] - batch.prompt_len  # trimmed
    for b in range(batch.num_rows):
        toks = batch.tokens_BT[b][m_BT[b]].tolist()
        assert tok.eos_token_id not in toks[:-1]
        assert m_BT[b, batch.prompt_len : batch.prompt_len + len(toks)].all()  # contiguous


def batch_sizes_seen(model) -> list[int]:
    """Rows per lm_head call: shows whether finished rows were dropped from the batch."""
    sizes = []
    model.lm_head.register_forward_hook(lambda mod, inp, out: sizes.append(out.shape[0]))
    return sizes


ARCHS = ["llama", "llama-mha", "llama-tied", "qwen3", "qwen3-wide", "qwen2", "mistral"]


@pytest.mark.parametrize("arch", ARCHS)
def test_sampler_logprobs_equal_trainer_logprobs(tok, arch):
    model = model_for(tok, arch)
    assert kv_supported(model) is None
    batch = kv_sampler(model, tok, 12).sample(as_prompts(tok), 3, torch.Generator().manual_seed(0))
    assert batch.num_rows == 12 and batch.completion_mask_BT.sum() > 12
    assert batch.sampler_lp_BT.requires_grad is False and not batch.tokens_BT.is_inference()
    assert batch.prompt_index_B.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert_matches_trainer(model, tok, batch)
    # the prompt block is laid out exactly like HFSampler's (left padding to the longest prompt)
    ref = hf_sampler(model, tok, 12).sample(as_prompts(tok), 3, torch.Generator().manual_seed(0))
    P = ref.prompt_len
    assert batch.prompt_len == P
    assert torch.equal(batch.tokens_BT[:, :P], ref.tokens_BT[:, :P])
    assert torch.equal(batch.attention_mask_BT[:, :P], ref.attention_mask_BT[:, :P])


def test_wide_lm_head_is_packed_and_matches_the_trainer(tok, monkeypatch):
    import opd.fast.decode as kv
    from opd.fast.packed import PackedLinears, packing_works

    if not packing_works():
        pytest.skip("this torch build lacks oneDNN linear")
    made = []

    class Spy(PackedLinears):
        def __init__(self, only=None):
            super().__init__(only)
            made.append(self)

    monkeypatch.setattr(kv, "PACK_HEAD_MIN", 0)  # this tiny head counts as wide
    monkeypatch.setattr(kv, "PackedLinears", Spy)
    model = model_for(tok, "qwen2")  # padded vocabulary: the packed head's extra rows are cut
    batch = kv_sampler(model, tok, 10).sample(as_prompts(tok), 2, torch.Generator().manual_seed(0))
    assert_matches_trainer(model, tok, batch)
    assert len(made) == 1 and list(made[0].packed) == [id(model.lm_head)]


def test_mlp_with_another_activation_matches_the_trainer(tok):
    """The decode loop takes SiLU in place and calls any other activation module as is."""
    from transformers.activations import ACT2FN

    model = model_for(tok, "llama", seed=3)
    for layer in model.model.layers:
        layer.mlp.act_fn = ACT2FN["gelu"]
    batch = kv_sampler(model, tok, 10).sample(as_prompts(tok), 2, torch.Generator().manual_seed(0))
    assert_matches_trainer(model, tok, batch)
    silu = model_for(tok, "llama", seed=3)
    same = kv_sampler(silu, tok, 10).sample(as_prompts(tok), 2, torch.Generator().manual_seed(0))
    m_BT = batch.completion_mask_BT & same.completion_mask_BT
    assert not torch.allclose(batch.sampler_lp_BT[m_BT], same.sampler_lp_BT[m_BT], atol=1e-3)


def test_bfloat16_model_samples_in_its_dtype(tok):
    model = model_for(tok, "qwen3").to(torch.bfloat16)
    batch = kv_sampler(model, tok, 8).sample(as_prompts(tok), 2, torch.Generator().manual_seed(0))
    assert batch.sampler_lp_BT.dtype == torch.float32
    assert_matches_trainer(model, tok, batch, atol=0.1)  # bf16 kernels round differently


def test_one_bf16_query_attends_like_float32_attention():
    """A bf16 decode step takes float32 products on a CPU (SDPA is ~3x slower there)."""
    import torch.nn.functional as F

    from opd.fast.llama import additive, attend, one_query_attention

    g = torch.Generator().manual_seed(0)
    A, H, K, S, D = 3, 8, 2, 9, 16  # 4 query heads per kv head
    q = torch.randn(A, H, 1, D, generator=g)
    k, v = torch.randn(2, A, K, S, D, generator=g).unbind(0)
    seen = torch.rand(A, 1, 1, S, generator=g) > 0.4
    seen[..., -1] = True  # a decode query sees itself
    mask = additive(seen, torch.float32)
    wide = [x.repeat_interleave(H // K, 1) for x in (k, v)]
    ref = F.scaled_dot_product_attention(q, *wide, attn_mask=mask, scale=D**-0.5).view(A, H * D)
    assert torch.allclose(attend(q, k, v, mask, D**-0.5), ref, atol=1e-5)  # float32: SDPA
    bf = [x.bfloat16() for x in (q, k, v, mask)]
    got = attend(*bf, D**-0.5)
    assert got.dtype == torch.bfloat16 and torch.allclose(got.float(), ref, atol=2e-2)
    grouped = (bf[0].reshape(A, K, H // K, D), *bf[1:])
    assert torch.equal(got, one_query_attention(*grouped, D**-0.5).view(A, H * D))  # its path
    v_noise = bf[2].masked_fill(~seen[:, :, 0, :, None], 1e4)  # keys it must not see
    assert torch.equal(attend(bf[0], bf[1], v_noise, bf[3], D**-0.5), got)


def test_runs_under_bfloat16_autocast(tok):
    model = model_for(tok, "llama")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        batch = kv_sampler(model, tok, 8).sample(
            as_prompts(tok), 2, torch.Generator().manual_seed(0)
        )
        assert_matches_trainer(model, tok, batch, atol=0.05)


@pytest.mark.parametrize("name", ["teacher", "qwen3", "padded"])
def test_greedy_tokens_equal_hf_sampler(models, tok, name):
    model = load_model(str(models[name]))
    prompts = as_prompts(tok, ["abc=", "hello=", "a=", "defgabc=", "ij=", "bad="])
    kv = kv_sampler(model, tok, 16, temperature=0.0).sample(prompts, 2, torch.Generator())
    hf = hf_sampler(model, tok, 16, temperature=0.0).sample(prompts, 2, torch.Generator())
    assert torch.equal(kv.tokens_BT, hf.tokens_BT)
    assert torch.equal(kv.attention_mask_BT, hf.attention_mask_BT)
    assert torch.equal(kv.completion_mask_BT, hf.completion_mask_BT)
    assert torch.allclose(kv.sampler_lp_BT, hf.sampler_lp_BT, atol=1e-5)
    if name == "teacher":  # the trained reverser stops at different lengths
        lengths = kv.completion_mask_BT.sum(1)
        assert lengths.min() < lengths.max()
    # looking at finished rows only every few steps (as on a GPU) changes nothing but the work
    sparse = kv_sampler(model, tok, 16, temperature=0.0)
    sparse.check_every = 3
    again = sparse.sample(prompts, 2, torch.Generator())
    for field in ("tokens_BT", "attention_mask_BT", "completion_mask_BT", "sampler_lp_BT"):
        assert torch.equal(getattr(again, field), getattr(kv, field)), field


def chi2_critical(dof: int) -> float:
    """The 0.999 quantile of chi-square(dof): scipy's when installed, else Wilson-Hilferty.

    Wilson-Hilferty: dof * (1 - 2/(9 dof) + z sqrt(2/(9 dof)))^3 with z = 3.0902 (the normal's
    0.999 quantile); within 1% of the exact value for dof >= 3 (e.g. 16.27 exact at dof 3).
    """
    try:
        from scipy.stats import chi2

        return float(chi2.ppf(0.999, dof))
    except ImportError:
        c = 2 / (9 * dof)
        return dof * (1 - c + 3.0902 * c**0.5) ** 3


def chi2_goodness(counts_V: torch.Tensor, probs_V: torch.Tensor) -> tuple[float, int]:
    """Pearson's statistic of counts against probabilities; bins expecting < 5 are pooled."""
    expected_V = probs_V.double() * counts_V.sum()
    big_V = expected_V >= 5
    obs = [*counts_V[big_V].tolist(), counts_V[~big_V].sum().item()]
    exp = [*expected_V[big_V].tolist(), expected_V[~big_V].sum().item()]
    if exp[-1] < 5:  # the pooled rest is too small to test: fold it into the largest bin
        i = max(range(len(exp) - 1), key=lambda j: exp[j])
        obs[i], exp[i] = obs[i] + obs.pop(), exp[i] + exp.pop()
    stat = sum((o - e) ** 2 / e for o, e in zip(obs, exp, strict=True))
    return stat, len(obs) - 1


def peaked_model(tok):
    """A random Llama with scaled-up logits, so the next-token distribution is far from uniform."""
    model = tiny.tiny_model(tok, hidden=32, layers=2, kv_heads=2, seed=7)
    with torch.no_grad():
        model.lm_head.weight.mul_(25.0)
    return model


def test_first_token_distribution_matches_the_model(tok):
    model = peaked_model(tok)
    prompt = tok("abc=")["input_ids"]
    with torch.no_grad():
        logits_V = model(input_ids=torch.tensor([prompt])).logits[0, -1, : len(tok)]
    probs_V = torch.softmax(logits_V, -1)
    assert probs_V.max() < 0.5 and (probs_V > 0.02).sum() >= 5  # a spread-out target
    for make in (kv_sampler, hf_sampler):  # HFSampler is the control
        batch = make(model, tok, 1).sample(
            as_prompts(tok, ["abc="]), 4000, torch.Generator().manual_seed(3)
        )
        counts_V = torch.bincount(batch.tokens_BT[:, -1], minlength=len(tok))
        stat, dof = chi2_goodness(counts_V, probs_V)
        assert stat < chi2_critical(dof), (make.__name__, stat, dof)


def test_second_token_distribution_matches_hf_sampler(tok):
    """Two-sample chi-square on the second token's marginal (equal sizes: sum (a-b)^2/(a+b))."""
    model = peaked_model(tok)
    counts = []
    for make, seed in ((kv_sampler, 4), (hf_sampler, 5)):
        batch = make(model, tok, 2).sample(
            as_prompts(tok, ["abc="]), 4000, torch.Generator().manual_seed(seed)
        )
        second_B = batch.tokens_BT[:, batch.prompt_len + 1]  # pad where the first was EOS
        counts.append(torch.bincount(second_B, minlength=len(tok)).double())
    a_V, b_V = counts
    big_V = (a_V + b_V) >= 10
    a = [*a_V[big_V].tolist(), a_V[~big_V].sum().item()]
    b = [*b_V[big_V].tolist(), b_V[~big_V].sum().item()]
    stat = sum((x - y) ** 2 / (x + y) for x, y in zip(a, b, strict=True) if x + y > 0)
    dof = sum(1 for x, y in zip(a, b, strict=True) if x + y > 0) - 1
    assert dof >= 4
    assert stat < chi2_critical(dof), (stat, dof)


def test_finished_rows_are_dropped_and_stay_padded(tok):
    model = model_for(tok, "llama", seed=3)
    eos = tok.eos_token_id
    # EOS about 1 in 8 per step: rows end at scattered steps, some run to max_new_tokens
    model.lm_head.register_forward_hook(
        lambda mod, inp, out: out.index_add(
            -1, torch.tensor([eos]), torch.full((*out.shape[:-1], 1), 2.0, dtype=out.dtype)
        )
    )
    sizes = batch_sizes_seen(model)
    batch = kv_sampler(model, tok, 24).sample(as_prompts(tok), 8, torch.Generator().manual_seed(1))
    m_BT = batch.completion_mask_BT
    lengths_B = m_BT.sum(1)
    ended_B = torch.tensor([batch.tokens_BT[b][m_BT[b]][-1] == eos for b in range(batch.num_rows)])
    assert ended_B.sum() >= 8 and lengths_B.min() < lengths_B.max()
    assert sizes[0] == 4  # the prefill runs each prompt once for its 8 rows
    decode = sizes[1:]
    assert decode[0] <= 32 and 0 < min(decode) < 32  # rows left the batch mid-decode
    assert decode == sorted(decode, reverse=True)
    assert_matches_trainer(model, tok, batch)
    # rows that never hit EOS ran to max_new_tokens
    assert (lengths_B[~ended_B] == 24).all()
    sizes.clear()
    with torch.no_grad():  # the trainer's forward goes through the hook once
        completion_logits(model, batch.tokens_BT, batch.attention_mask_BT, batch.prompt_len)
    assert len(sizes) == 1


def test_all_rows_finishing_stops_the_batch(tok):
    model = model_for(tok, "qwen3")
    eos = tok.eos_token_id
    model.lm_head.register_forward_hook(
        lambda mod, inp, out: out.index_fill(-1, torch.tensor([eos]), 1e4)
    )
    sizes = batch_sizes_seen(model)
    batch = kv_sampler(model, tok, 30).sample(as_prompts(tok), 2, torch.Generator().manual_seed(0))
    assert batch.tokens_BT.shape[1] == batch.prompt_len + 1
    assert (batch.tokens_BT[:, -1] == eos).all() and batch.completion_mask_BT[:, -1].all()
    assert len(sizes) == 1  # the prefill only: no decode step after everyone stopped


def truncated_logprobs(logits_BV, temperature, top_k, top_p):
    """log-probs of the temperature / top-k / top-p renormalised distribution (the sampler's)."""
    logits_BV = logits_BV.float() / temperature
    if top_k:
        kth_B1 = logits_BV.topk(top_k, -1).values[:, -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth_B1, float("-inf"))
    if top_p < 1:
        probs_BV = torch.softmax(logits_BV, -1)
        # a token stays when the tokens more likely than it hold less than top_p of the mass
        above_BVV = probs_BV[:, None, :] > probs_BV[:, :, None]  # [b, v, u]: p_u > p_v
        mass_above_BV = (above_BVV * probs_BV[:, None, :]).sum(-1)
        logits_BV = logits_BV.masked_fill(mass_above_BV >= top_p, float("-inf"))
    return torch.log_softmax(logits_BV, -1)


@pytest.mark.parametrize("kw", [dict(top_k=5), dict(top_p=0.6, temperature=0.7)])
def test_topk_topp_logprobs_are_renormalised(tok, kw):
    model = peaked_model(tok)
    batch = kv_sampler(model, tok, 6, **kw).sample(
        as_prompts(tok), 4, torch.Generator().manual_seed(2)
    )
    with torch.no_grad():
        logits_BCV = completion_logits(
            model, batch.tokens_BT, batch.attention_mask_BT, batch.prompt_len
        )[..., : len(tok)]
    B, C, V = logits_BCV.shape
    lp_BCV = truncated_logprobs(
        logits_BCV.reshape(B * C, V),
        kw.get("temperature", 1.0),
        kw.get("top_k", 0),
        kw.get("top_p", 1.0),
    ).view(B, C, V)
    tokens_BC = batch.tokens_BT[:, batch.prompt_len :]
    want_BC = lp_BCV.gather(-1, tokens_BC[..., None]).squeeze(-1)
    m_BC = batch.completion_mask_BT[:, batch.prompt_len :]
    got_BC = batch.sampler_lp_BT[:, batch.prompt_len :]
    assert torch.isfinite(want_BC[m_BC]).all()  # every sampled token survived the truncation
    assert torch.allclose(got_BC[m_BC], want_BC[m_BC], atol=1e-5)
    full_BC = torch.log_softmax(logits_BCV.float(), -1).gather(-1, tokens_BC[..., None])[..., 0]
    assert (got_BC[m_BC] > full_BC[m_BC] + 1e-4).any()  # renormalised, not the raw log-probs


def gpt2(tok):
    config = GPT2Config(
        vocab_size=len(tok),
        n_embd=32,
        n_layer=1,
        n_head=2,
        n_positions=64,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
    )
    return AutoModelForCausalLM.from_config(config)


def test_unsupported_models_fall_back_to_hf_sampler(tok):
    model = gpt2(tok)
    assert "gpt2" in kv_supported(model)
    assert isinstance(make_sampler(model, tok, len(tok), 4), HFSampler)
    batch = make_sampler(model, tok, len(tok), 4).sample(
        as_prompts(tok), 1, torch.Generator().manual_seed(0)
    )
    assert batch.num_rows == len(WORDS)
    with pytest.raises(OpdError, match="sampling.backend=kv does not support this model: .*gpt2"):
        make_sampler(model, tok, len(tok), 4, backend="kv")
    with pytest.raises(OpdError, match="gpt2"):
        KVCacheSampler(model, tok.pad_token_id, [tok.eos_token_id], len(tok), 4)
    # a run's engine samples for training (build.py); evaluation and checks sample in process
    assert isinstance(make_sampler(model, tok, len(tok), 4, backend="vllm"), HFSampler)
    with pytest.raises(OpdError, match="'auto', 'kv' or 'hf'"):
        make_sampler(model, tok, len(tok), 4, backend="fast")
    llama = model_for(tok, "llama")
    assert isinstance(make_sampler(llama, tok, len(tok), 4), KVCacheSampler)
    assert isinstance(make_sampler(llama, tok, len(tok), 4, backend="kv"), KVCacheSampler)
    assert isinstance(make_sampler(llama, tok, len(tok), 4, backend="hf"), HFSampler)


def test_kv_supported_names_the_reason(tok):
    mistral = AutoModelForCausalLM.from_config(
        MistralConfig(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            sliding_window=16,
        )
    )
    assert "sliding-window" in kv_supported(mistral)
    qwen = AutoModelForCausalLM.from_config(
        Qwen2Config(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            use_sliding_window=True,
            sliding_window=8,
            max_window_layers=1,
        )
    )
    assert "sliding-window" in kv_supported(qwen)
    llama = model_for(tok, "llama")
    llama.model.layers[1].register_forward_hook(lambda *a: None)  # we would bypass it
    assert "forward hooks on LlamaDecoderLayer" in kv_supported(llama)
    llama = model_for(tok, "llama")
    llama.model.layers[0].mlp.register_forward_pre_hook(lambda *a: None)
    assert "forward hooks on LlamaMLP" in kv_supported(llama)

    class OtherMLP(torch.nn.Module):
        def forward(self, x):
            return x

    llama = model_for(tok, "llama")
    llama.model.layers[1].mlp = OtherMLP()
    assert "MLP OtherMLP is not LlamaMLP" in kv_supported(llama)
    dynamic = tiny.tiny_model(tok, hidden=32, layers=1)
    dynamic.model.rotary_emb.rope_type = "dynamic"
    assert "rotary type 'dynamic'" in kv_supported(dynamic)


def test_lora_wrapped_student_samples_with_its_adapters(tok):
    model = add_lora(
        model_for(tok, "llama", seed=5), rank=4, alpha=8.0, target_modules="all-linear"
    )
    torch.manual_seed(0)
    with torch.no_grad():  # lora_B starts at zero: make the adapters change the output
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    assert kv_supported(model) is None
    sampler = make_sampler(model, tok, len(tok), 10, backend="kv")
    model.train()
    batch = sampler.sample(as_prompts(tok), 3, torch.Generator().manual_seed(0))
    assert model.training  # train/eval state restored
    assert_matches_trainer(model, tok, batch)
    with torch.no_grad(), model.disable_adapter():
        base_BT = completion_logprobs(
            model, batch.tokens_BT, batch.attention_mask_BT, batch.prompt_len, len(tok)
        )
    m_BT = batch.completion_mask_BT
    assert (base_BT[m_BT] - batch.sampler_lp_BT[m_BT]).abs().max() > 1e-3  # adapters were used


def test_unknown_backend_is_a_config_error():
    cfg = apply_overrides(
        Config(),
        {
            "model.student": "s",
            "model.teacher": "t",
            "data.prompts": "p",
            "run.out": "o",
            "sampling.backend": "fast",
        },
    )
    with pytest.raises(
        OpdError, match="sampling.backend='fast': must be 'auto', 'kv', 'hf' or 'vllm'"
    ):
        validate(cfg)


@pytest.mark.parametrize("backend", ["kv", "hf"])
def test_distill_runs_with_either_backend(models, prompts_file, tmp_path, backend):
    from opd.cli import main

    out = tmp_path / backend
    with pytest.raises(SystemExit) as exc:
        main(distill_args(models, prompts_file, out, 2, f"sampling.backend={backend}"))
    assert exc.value.code == 0
    assert json.loads((out / "config.json").read_text())["sampling"]["backend"] == backend
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert abs(rows[0]["ratio/mean"] - 1.0) < 1e-4  # sampler and trainer agree before an update


def test_pad_equal_to_eos_keeps_eos_in_the_completion(models):
    from opd.models import load_tokenizer

    tok = load_tokenizer(str(models["student"]))
    tok.pad_token = tok.eos_token  # the pitfall: pad id == eos id
    model = load_model(str(models["student"]))
    batch = kv_sampler(model, tok, 30).sample(
        as_prompts(tok, ["ab=", "abcdef="]), 16, torch.Generator().manual_seed(2)
    )
    m_BT = batch.completion_mask_BT
    ended = [
        b for b in range(batch.num_rows) if batch.tokens_BT[b][m_BT[b]][-1] == tok.eos_token_id
    ]
    assert ended and any(m_BT[b].sum() < m_BT.shape[1] - batch.prompt_len for b in ended)
    for b in ended:
        last = m_BT[b].nonzero().max()
        assert batch.tokens_BT[b, last] == tok.eos_token_id and batch.sampler_lp_BT[b, last] < 0
    assert_matches_trainer(model, tok, batch)


def test_sparse_finished_checks_with_row_drops_keep_logprobs_exact(models, tok):
    """On a GPU finished rows are looked at every 8th step (here every 4th, so that the test
    model's 2-8 token answers fall on both sides of a look): rows that stopped keep decoding
    until then, rows leave the batch later; log-probs must still be the trainer's."""
    model = load_model(str(models["teacher"]))
    prompts = as_prompts(tok, ["abc=", "hello=", "a=", "defgabc=", "ij=", "bad="])
    sampler = kv_sampler(model, tok, 20)
    sampler.check_every = 4
    # the lengths depend on how the fixture's teacher trained on this machine: take the first
    # seed whose rows stop both before the first look and after it
    for seed in range(5, 25):
        b = sampler.sample(prompts, 4, torch.Generator().manual_seed(seed))
        lengths = b.completion_mask_BT.sum(1)
        if lengths.min() < 4 < lengths.max():
            break
    else:
        pytest.fail(f"no seed gave rows stopping before and after step 4: {lengths.tolist()}")
    with torch.no_grad():
        lp_BT = completion_logprobs(model, b.tokens_BT, b.attention_mask_BT, b.prompt_len, len(tok))
    m = b.completion_mask_BT
    assert torch.allclose(lp_BT[m], b.sampler_lp_BT[m], atol=1e-5)
    assert (b.tokens_BT[:, b.prompt_len :][~m[:, b.prompt_len :]] == tok.pad_token_id).all()
