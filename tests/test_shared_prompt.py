"""Teacher scoring that runs each distinct prompt once equals scoring every row on its own."""

import pytest
import torch

from opd import tiny
from opd.data import Prompt
from opd.fast.shared_prompt import score_shared_prompts, shared_prompt_supported
from opd.logprobs import completion_logprobs
from opd.samplers import make_sampler
from opd.teachers.local import LocalTeacher


@pytest.fixture(scope="module")
def tok():
    return tiny.char_tokenizer()


def rollouts(model, tok, max_new_tokens=12, seed=0):
    # ragged prompts (left padding), one prompt twice (its 6 rows share one prefill), EOS likely
    words = ["ab=", "abcdef=", "q=", "ab="]
    prompts = [Prompt(ids=tok(w)["input_ids"], row={}, where=w) for w in words]
    sampler = make_sampler(model, tok, len(tok), max_new_tokens, backend="hf")
    return sampler.sample(prompts, 3, torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_shared_prompt_scores_equal_row_by_row_scores(tok, arch):
    model = tiny.tiny_model(tok, arch=arch, hidden=32, layers=2, vocab_pad=3, seed=1).eval()
    assert shared_prompt_supported(model)
    b = rollouts(model, tok)
    assert b.completion_mask_BT.sum(1).min() < b.completion_mask_BT.sum(1).max()  # ragged
    with torch.inference_mode():
        ref_BT = completion_logprobs(
            model, b.tokens_BT, b.attention_mask_BT, b.prompt_len, len(tok)
        )
        got_BT = score_shared_prompts(
            model, b.tokens_BT, b.attention_mask_BT, b.completion_mask_BT, b.prompt_len, len(tok), 5
        )
    m = b.completion_mask_BT
    assert torch.allclose(got_BT[m], ref_BT[m], atol=1e-5)
    assert (got_BT[~m] == 0).all()


def test_one_token_completions_and_the_local_teacher(tok):
    model = tiny.tiny_model(tok, hidden=32, layers=2, seed=2).eval()
    b = rollouts(model, tok, max_new_tokens=1)  # nothing after the prompt is fed
    with torch.inference_mode():
        ref_BT = completion_logprobs(
            model, b.tokens_BT, b.attention_mask_BT, b.prompt_len, len(tok)
        )
    teacher = LocalTeacher(model, len(tok), micro_batch_size=5)  # micro-batches split groups
    assert teacher.shared_prompts
    m = b.completion_mask_BT
    assert torch.allclose(teacher.score(b)[m], ref_BT[m], atol=1e-5)
    b = rollouts(model, tok, seed=3)
    with torch.inference_mode():
        ref_BT = completion_logprobs(
            model, b.tokens_BT, b.attention_mask_BT, b.prompt_len, len(tok)
        )
    m = b.completion_mask_BT
    assert torch.allclose(teacher.score(b)[m], ref_BT[m], atol=1e-5)


def test_local_teacher_packs_its_layers_once_and_scores_the_same(tok, monkeypatch):
    from opd.fast.packed import PackedLinears, call_module, packing_works

    if not packing_works():
        pytest.skip("this torch build lacks oneDNN linear")
    model = tiny.tiny_model(tok, arch="qwen3", hidden=32, layers=2, seed=4).eval()
    b = rollouts(model, tok, seed=5)
    with torch.inference_mode():
        ref_BT = completion_logprobs(
            model, b.tokens_BT, b.attention_mask_BT, b.prompt_len, len(tok)
        )
    teacher = LocalTeacher(model, len(tok))
    assert isinstance(teacher.linear, PackedLinears)
    m = b.completion_mask_BT
    assert torch.allclose(teacher.score(b)[m], ref_BT[m], atol=1e-5)
    projections = [mod for mod in model.modules() if type(mod) is torch.nn.Linear]
    packed = dict(teacher.linear.packed)
    assert len(packed) == len(projections) - 1  # every layer but the LM head (chunked apart)
    teacher.score(b)  # a second step reuses the packed weights
    assert all(teacher.linear.packed[k][1] is v[1] for k, v in packed.items())
    monkeypatch.setattr("opd.teachers.local.PACK_TEACHER_MAX_BYTES", 0)
    assert LocalTeacher(model, len(tok)).linear is call_module  # too big to keep a copy


def test_models_the_decoder_does_not_mirror_score_row_by_row(tok):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=1, n_head=2, n_positions=64)
    assert not shared_prompt_supported(GPT2LMHeadModel(cfg))
    assert not LocalTeacher(GPT2LMHeadModel(cfg), len(tok)).shared_prompts
