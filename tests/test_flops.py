"""The FLOPs ledger: parameter counts by hand, the attention closed form, the ledger's sums."""

import json

import pytest
import torch

from opd.flops import (
    Ledger,
    ModelShape,
    forward_flops,
    model_shape,
    sampling_flops,
    train_flops,
)

V, D, FFN, HEADS = 10, 8, 16, 2  # vocab, hidden, MLP width, query heads


def llama(tied: bool, kv_heads: int = 1):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=V,
        hidden_size=D,
        intermediate_size=FFN,
        num_hidden_layers=1,
        num_attention_heads=HEADS,
        num_key_value_heads=kv_heads,
        tie_word_embeddings=tied,
    )
    return LlamaForCausalLM(config)


def llama_params_by_hand(tied: bool) -> int:
    head_dim, kv_heads = D // HEADS, 1
    embed = V * D
    attn = D * D + 2 * D * kv_heads * head_dim + D * D  # q, k, v (one KV head), o; no biases
    mlp = 3 * D * FFN  # gate, up, down
    norms = 2 * D  # input and post-attention RMSNorm weights
    lm_head = 0 if tied else V * D
    return embed + attn + mlp + norms + D + lm_head  # + D: the final norm


@pytest.mark.parametrize("tied", [False, True])
def test_model_shape_counts_every_parameter_tied_once(tied):
    shape = model_shape(llama(tied))
    assert shape == ModelShape(llama_params_by_hand(tied), n_layers=1, d_attn=D)
    assert llama_params_by_hand(False) == 760 and llama_params_by_hand(True) == 680


def test_model_shape_uses_an_explicit_head_dim():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        vocab_size=V,
        hidden_size=D,
        intermediate_size=FFN,
        num_hidden_layers=1,
        num_attention_heads=HEADS,
        num_key_value_heads=1,
        head_dim=6,  # not hidden // heads = 4
        tie_word_embeddings=False,
    )
    # q 8x12, k and v 8x6, o 12x8, q_norm and k_norm 6 each, MLP, 3 norms of 8, embed, head
    by_hand = 96 + 48 + 48 + 96 + 6 + 6 + 3 * D * FFN + 3 * D + 2 * V * D
    assert model_shape(Qwen3ForCausalLM(config)) == ModelShape(by_hand, n_layers=1, d_attn=12)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # peft calls a deprecated HF name
def test_model_shape_of_a_peft_model_adds_the_adapter():
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(
        llama(tied=False), LoraConfig(r=2, target_modules=["q_proj", "v_proj"])
    )
    adapter = 2 * (D + D) + 2 * (D + D // HEADS)  # A (r x in) + B (out x r): q 8->8, v 8->4
    assert model_shape(peft_model) == ModelShape(llama_params_by_hand(False) + adapter, 1, D)


SHAPE = ModelShape(params=760, n_layers=1, d_attn=8)


def test_forward_flops_by_hand():
    # one row, 5 tokens from scratch: dense 2*760*5, attention 4*1*8*(1+2+3+4+5)
    assert forward_flops(SHAPE, [0], [5]) == 2 * 760 * 5 + 4 * 8 * 15 == 8080
    # 2 tokens after 3 cached ones: positions 3 and 4 see 4 and 5 keys
    assert forward_flops(SHAPE, [3], [2]) == 2 * 760 * 2 + 4 * 8 * (4 + 5)
    assert forward_flops(SHAPE, [], []) == 0
    assert forward_flops(SHAPE, [7], [0]) == 0


def naive_forward(shape: ModelShape, context_B, new_B) -> int:
    total = 0
    for c, n in zip(context_B, new_B, strict=True):
        for t in range(c, c + n):
            total += 2 * shape.params + 2 * shape.n_layers * (t + 1) * shape.d_attn * 2
    return total


def test_closed_form_matches_a_loop_over_tokens():
    g = torch.Generator().manual_seed(0)
    shape = ModelShape(params=12345, n_layers=3, d_attn=48)
    context_B = torch.randint(0, 300, (16,), generator=g)
    new_B = torch.randint(0, 300, (16,), generator=g)
    assert forward_flops(shape, context_B, new_B) == naive_forward(
        shape, context_B.tolist(), new_B.tolist()
    )


def test_sampling_with_a_kv_cache_costs_what_scoring_costs():
    shape = ModelShape(params=999, n_layers=2, d_attn=16)
    prompts, completions = [4, 7, 1], [9, 0, 5]
    # prefill each prompt, then decode one token at a time against the cache
    by_steps = forward_flops(shape, [0, 0, 0], prompts)
    for b, (p, m) in enumerate(zip(prompts, completions, strict=True)):
        for i in range(m):
            ctx, new = [0, 0, 0], [0, 0, 0]
            ctx[b], new[b] = p + i, 1
            by_steps += forward_flops(shape, ctx, new)
    scoring = forward_flops(
        shape, [0, 0, 0], [p + m for p, m in zip(prompts, completions, strict=True)]
    )
    assert sampling_flops(shape, prompts, completions) == by_steps == scoring
    assert sampling_flops(shape, torch.tensor(prompts), torch.tensor(completions)) == scoring


def test_train_is_three_forwards():
    seq_B = [5, 12, 3]
    assert train_flops(SHAPE, seq_B) == 3 * forward_flops(SHAPE, [0, 0, 0], seq_B)
    # dense part is 6 * N per token
    no_attention = ModelShape(params=760, n_layers=1, d_attn=0)
    assert train_flops(no_attention, seq_B) == 6 * 760 * 20


def test_bad_lengths_are_refused():
    with pytest.raises(ValueError, match="rows"):
        forward_flops(SHAPE, [0, 0], [1])
    with pytest.raises(ValueError, match="negative"):
        train_flops(SHAPE, [3, -1])
    with pytest.raises(ValueError, match="1-D"):
        train_flops(SHAPE, [[3]])


def test_ledger_accumulates_resets_and_round_trips():
    ledger = Ledger()
    ledger.add("student_sampling", 100, 2.0)
    ledger.add("train", 300, 1.0)
    ledger.add("train", 60, 0.5)
    m1 = ledger.step_metrics()
    assert m1 == {
        "flops/student_sampling": 100.0,
        "flops/student_sampling_total": 100.0,
        "flops/student_sampling_per_s": 50.0,
        "flops/train": 360.0,
        "flops/train_total": 360.0,
        "flops/train_per_s": 240.0,
        "flops/step": 460.0,
        "flops/total": 460.0,
    }
    ledger.add("train", 40)  # no seconds: no rate
    m2 = ledger.step_metrics()
    assert m2["flops/student_sampling"] == 0.0 and m2["flops/student_sampling_total"] == 100.0
    assert m2["flops/train"] == 40.0 and m2["flops/train_total"] == 400.0
    assert "flops/train_per_s" not in m2
    assert m2["flops/step"] == 40.0 and m2["flops/total"] == 500.0
    assert ledger.step_metrics()["flops/step"] == 0.0

    ledger.add("teacher_scoring", 1.2345678901234567e21, 0.1)  # mid-step, huge, not an integer
    resumed = Ledger()
    resumed.load_state_dict(json.loads(json.dumps(ledger.state_dict())))
    assert resumed.state_dict() == ledger.state_dict()
    assert resumed.step_metrics() == ledger.step_metrics()
    resumed.add("eval", 7.0, 0.5)  # a side ledger (evaluation): no flops/step, flops/total
    assert resumed.step_metrics(totals=False) == {
        "flops/eval": 7.0,
        "flops/eval_total": 7.0,
        "flops/eval_per_s": 14.0,
        "flops/teacher_scoring": 0.0,
        "flops/teacher_scoring_total": 1.2345678901234567e21,
        "flops/student_sampling": 0.0,
        "flops/student_sampling_total": 100.0,
        "flops/train": 0.0,
        "flops/train_total": 400.0,
    }
