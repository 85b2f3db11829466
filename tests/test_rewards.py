"""Verifiable rewards and GRPO-style advantages on hand-computed tensors."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from opd.errors import OpdError
from opd.evaluate import get_extractor
from opd.rewards import (
    combined_advantages,
    group_centered,
    reward_advantages_BT,
    task_rewards,
)


def test_rewards_with_the_exact_extractor():
    texts = ["  42\n", "42 apples", "forty-two", ""]
    answers = ["42", "42", " forty-two ", "x"]
    r = task_rewards(texts, answers, get_extractor("exact"))
    assert r.dtype == torch.float32
    assert r.tolist() == [1.0, 0.0, 1.0, 0.0]


def test_rewards_with_the_last_number_extractor():
    texts = ["3 + 4 = 7", "so the answer is -2.5.", "no number here", "12 then 13"]
    answers = ["7", "-2.5", "0", 12]  # a JSON number compares as its text
    r = task_rewards(texts, answers, get_extractor("last-number"))
    assert r.tolist() == [1.0, 1.0, 0.0, 0.0]


def test_missing_answer_and_failing_extractor_name_the_row():
    with pytest.raises(OpdError, match="row 1 has no answer"):
        task_rewards(["a", "b"], ["a", None], get_extractor("exact"))

    def broken(text):
        raise KeyError("boom")

    with pytest.raises(OpdError, match="row 0"):
        task_rewards(["a"], ["a"], broken)
    with pytest.raises(ValueError, match="2 completions but 1 answers"):
        task_rewards(["a", "b"], ["a"], get_extractor("exact"))


def test_group_centered_by_hand():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0])
    assert torch.allclose(group_centered(r, 3), torch.tensor([2, -1, -1, 0, 0, 0]) / 3)
    assert torch.allclose(group_centered(r, 2), torch.tensor([0.5, -0.5, -0.5, 0.5, 0.0, 0.0]))
    assert torch.equal(group_centered(r, 1), torch.zeros(6))
    # unbiased std of {1, 0, 0} is sqrt(1/3): 2/3 / sqrt(1/3) = 2/sqrt(3)
    normed = group_centered(r, 3, normalize_std=True)
    s = 3**0.5
    assert torch.allclose(normed, torch.tensor([2 / s, -1 / s, -1 / s, 0, 0, 0]), atol=1e-5)
    with pytest.raises(ValueError, match="groups of 4"):
        group_centered(r, 4)


rewards_and_groups = st.integers(1, 6).flatmap(
    lambda g: st.tuples(
        st.lists(st.floats(-10, 10, allow_nan=False, width=32), min_size=g, max_size=4 * g).map(
            lambda xs: xs[: len(xs) // g * g]
        ),
        st.just(g),
    )
)


@settings(max_examples=60, deadline=None)
@given(rewards_and_groups, st.booleans())
def test_group_advantages_sum_to_zero_per_group(case, normalize):
    values, g = case
    adv_PG = group_centered(torch.tensor(values), g, normalize_std=normalize).reshape(-1, g)
    # float32 rounding, relative to the advantages' own size (normalising can magnify it)
    tol_P = 1e-5 * adv_PG.abs().sum(dim=1) + 1e-5 * (1 + torch.tensor(values).abs().max())
    assert (adv_PG.sum(dim=1).abs() <= tol_P).all()


@settings(max_examples=30, deadline=None)
@given(st.floats(-5, 5, allow_nan=False, width=32), st.integers(1, 8), st.booleans())
def test_equal_rewards_give_zero_advantages(value, g, normalize):
    adv = group_centered(torch.full((3 * g,), value), g, normalize_std=normalize)
    assert torch.equal(adv, torch.zeros(3 * g))


@settings(max_examples=60, deadline=None)
@given(
    st.integers(2, 8).flatmap(
        lambda g: st.lists(st.sampled_from([0.0, 1.0]), min_size=g, max_size=g)
    )
)
def test_std_normalisation_gives_unit_std_per_group(values):
    r = torch.tensor(values)
    if r.min() == r.max():
        return  # constant groups are covered above: all zeros
    adv = group_centered(r, len(values), normalize_std=True)
    assert abs(adv.std(correction=1).item() - 1.0) < 1e-4
    assert abs(adv.mean().item()) < 1e-6


def test_broadcast_respects_the_mask():
    adv_B = torch.tensor([0.5, -1.0])
    mask_BT = torch.tensor([[False, True, True, False], [False, False, True, True]])
    out = reward_advantages_BT(adv_B, mask_BT)
    assert out.dtype == torch.float32
    assert torch.equal(out, torch.tensor([[0, 0.5, 0.5, 0], [0, 0, -1.0, -1.0]]))


def test_combined_advantages_add_on_the_mask_only():
    reward_adv_B = torch.tensor([1.0, -0.5])
    kl_adv_BT = torch.tensor([[9.0, -0.25, 0.5], [float("nan"), 0.1, 7.0]])
    mask_BT = torch.tensor([[False, True, True], [False, True, False]])
    out = combined_advantages(reward_adv_B, kl_adv_BT, mask_BT)
    assert torch.allclose(out, torch.tensor([[0.0, 0.75, 1.5], [0.0, -0.4, 0.0]]))
    # no KL term: the broadcast reward advantage
    zeros = torch.zeros_like(kl_adv_BT)
    assert torch.equal(
        combined_advantages(reward_adv_B, zeros, mask_BT),
        reward_advantages_BT(reward_adv_B, mask_BT),
    )
