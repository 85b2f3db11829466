"""The pure maths: advantages and losses on hand-computed tensors."""

import math

import pytest
import torch

from opd.objectives import discounted_cumsum, kl_advantages, lr_at, policy_gradient_loss, reverse_kl

S = torch.tensor([[-1.0, -2.0, -0.5, 0.0], [-0.2, -0.4, 0.0, 0.0]])
T_ = torch.tensor([[-1.5, -1.0, -0.5, 9.0], [-0.1, -3.0, 0.0, 0.0]])
M = torch.tensor([[True, True, True, False], [True, True, False, False]])


def test_reverse_kl_and_advantage_gamma0():
    k = reverse_kl(S, T_, M)
    assert torch.allclose(k, torch.tensor([[0.5, -1.0, 0.0, 0.0], [-0.1, 2.6, 0.0, 0.0]]))
    adv = kl_advantages(S, T_, M, kl_coef=2.0, discount=0.0)
    assert torch.allclose(adv, torch.tensor([[-1.0, 2.0, 0.0, 0.0], [0.2, -5.2, 0.0, 0.0]]))


def test_advantage_with_discount():
    adv = kl_advantages(S, T_, M, kl_coef=1.0, discount=0.5)
    a = [-0.5, 1.0, -0.0]  # row 0 per-token advantages
    expect0 = [a[0] + 0.5 * a[1] + 0.25 * a[2], a[1] + 0.5 * a[2], a[2], 0.0]
    b = [0.1, -2.6]
    expect1 = [b[0] + 0.5 * b[1], b[1], 0.0, 0.0]
    assert torch.allclose(adv, torch.tensor([expect0, expect1]), atol=1e-6)


def test_discount_one_is_plain_future_sum_and_mask_blocks_values():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    m = torch.tensor([[True, True, True, False]])
    assert torch.equal(discounted_cumsum(x, m, 1.0), torch.tensor([[6.0, 5.0, 3.0, 0.0]]))


def test_loss_at_ratio_one_is_minus_mean_advantage():
    adv = torch.tensor([[1.0, -2.0, 0.5, 7.0]])
    m = torch.tensor([[True, True, True, False]])
    lp = torch.tensor([[-1.0, -1.0, -1.0, -1.0]], requires_grad=True)
    loss, stats = policy_gradient_loss(lp, lp.detach(), adv, m, num_tokens=3)
    assert loss.item() == pytest.approx(-(1.0 - 2.0 + 0.5) / 3)
    loss.backward()
    # d/d lp of -ratio*A/N at ratio 1 is -A/N; masked column gets no gradient
    assert torch.allclose(lp.grad, torch.tensor([[-1 / 3, 2 / 3, -0.5 / 3, 0.0]]))
    assert stats["ratio_sum"].item() == pytest.approx(3.0)


def test_loss_importance_ratio_and_global_normaliser():
    train = torch.tensor([[math.log(0.5), math.log(0.2)]])
    sampler = torch.tensor([[math.log(0.25), math.log(0.4)]])
    adv = torch.tensor([[1.0, 1.0]])
    m = torch.ones(1, 2, dtype=torch.bool)
    loss, stats = policy_gradient_loss(train, sampler, adv, m, num_tokens=10)
    assert loss.item() == pytest.approx(-(2.0 + 0.5) / 10)
    assert stats["ratio_max"].item() == pytest.approx(2.0)
    assert stats["ratio_min"].item() == pytest.approx(0.5)


def test_micro_batches_sum_to_the_full_batch_loss():
    g = torch.Generator().manual_seed(0)
    train = torch.randn(6, 5, generator=g)
    sampler = train + 0.1 * torch.randn(6, 5, generator=g)
    adv = torch.randn(6, 5, generator=g)
    m = torch.rand(6, 5, generator=g) > 0.3
    n = int(m.sum())
    full, _ = policy_gradient_loss(train, sampler, adv, m, n)
    parts = sum(
        policy_gradient_loss(train[i : i + 2], sampler[i : i + 2], adv[i : i + 2], m[i : i + 2], n)[
            0
        ]
        for i in range(0, 6, 2)
    )
    assert parts.item() == pytest.approx(full.item(), abs=1e-6)


def test_clip_ratio_ppo_surrogate():
    train = torch.tensor([[math.log(2.0), math.log(0.5)]])
    sampler = torch.zeros(1, 2)
    adv = torch.tensor([[1.0, -1.0]])
    m = torch.ones(1, 2, dtype=torch.bool)
    loss, _ = policy_gradient_loss(train, sampler, adv, m, 2, clip_ratio=0.2)
    # token 0: min(2*1, 1.2*1) = 1.2 ; token 1: min(0.5*-1, 0.8*-1) = -0.8
    assert loss.item() == pytest.approx(-(1.2 - 0.8) / 2)


def test_nonfinite_values_off_the_mask_do_not_poison_gradients():
    train = torch.tensor([[-1.0, float("-inf")]], requires_grad=True)
    sampler = torch.tensor([[-1.2, float("-inf")]])
    adv = torch.tensor([[0.5, float("nan")]])
    m = torch.tensor([[True, False]])
    loss, _ = policy_gradient_loss(train, sampler, adv, m, 1)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(train.grad).all()


def test_teacher_equal_to_sampler_gives_zero_advantage():
    adv = kl_advantages(S, S, M, kl_coef=1.0, discount=0.9)
    assert torch.count_nonzero(adv) == 0


def test_deadzone_zeroes_only_the_tokens_below_it_before_discounting():
    noisy = S + torch.tensor([[3e-7, -2e-7, 0.0, 0.0], [0.0, 1e-7, 0.0, 0.0]])
    noisy[0, 2] = S[0, 2] + 0.5  # one real difference among the rounding
    plain = kl_advantages(noisy, S, M, kl_coef=2.0, discount=0.5)
    assert torch.count_nonzero(plain) > 1  # rounding reaches every earlier token's advantage
    adv = kl_advantages(noisy, S, M, kl_coef=2.0, discount=0.5, deadzone=1e-4)
    # only the real difference survives, discounted back to the earlier tokens of its row
    assert torch.allclose(adv, torch.tensor([[-0.25, -0.5, -1.0, 0.0], [0.0, 0.0, 0.0, 0.0]]))
    # a difference at or above the deadzone is kept as it is
    kept = kl_advantages(S, T_, M, kl_coef=2.0, deadzone=0.1)
    assert torch.equal(kept, kl_advantages(S, T_, M, kl_coef=2.0))


def test_lr_schedule():
    assert lr_at(0, 1.0, 4, 10, "constant") == pytest.approx(0.25)
    assert lr_at(3, 1.0, 4, 10, "constant") == pytest.approx(1.0)
    assert lr_at(9, 1.0, 0, 10, "constant") == 1.0
    assert lr_at(0, 1.0, 0, 10, "cosine") == pytest.approx(1.0)
    assert lr_at(5, 1.0, 0, 10, "cosine") == pytest.approx(0.5)
    assert lr_at(10, 1.0, 0, 10, "cosine", min_lr_ratio=0.1) == pytest.approx(0.1)


def test_truncated_importance_sampling_caps_each_tokens_weight_and_its_gradient():
    from opd.objectives import policy_gradient_loss

    sampler = torch.tensor([[-2.0, -1.0, -3.0]])
    train = torch.tensor([[-1.0, -1.2, -3.0]], requires_grad=True)  # ratios e^1, e^-0.2, 1
    adv = torch.tensor([[0.5, -1.0, 2.0]])
    mask = torch.ones_like(adv, dtype=torch.bool)
    loss, _ = policy_gradient_loss(train, sampler, adv, mask, 3, tis_cap=2.0)
    loss.backward()
    r = torch.exp(train.detach() - sampler)
    w = torch.clamp(r, max=2.0)  # e^1 = 2.72 is cut to 2; the others keep their ratio
    assert loss.item() == pytest.approx(-(w * adv).sum().item() / 3)
    torch.testing.assert_close(train.grad, -(w * adv) / 3)  # d/dlp of r A is r A; capped: w A
    plain = train.detach().clone().requires_grad_(True)
    policy_gradient_loss(plain, sampler, adv, mask, 3)[0].backward()
    torch.testing.assert_close(plain.grad[:, 1:], train.grad[:, 1:])  # under the cap: the same
    assert not torch.allclose(plain.grad[:, :1], train.grad[:, :1])


def test_stale_rows_take_k_t_from_the_trained_policy_and_the_sampler_bias_points_away():
    """Rows an older policy sampled (one-step-off): k_t reads the trained policy's log-prob when
    the batch carries it. Its gradient is the IS-corrected reverse-KL gradient; the sampler's
    k_t adds -KL(policy || sampler)'s gradient, which pushes the policy away from the sampler."""
    from dataclasses import replace

    from opd.config import ObjectiveConfig
    from opd.losses import kl_and_reward_advantages
    from opd.types import Rollouts

    mask = torch.tensor([[False, True, True, True]])
    sampler = torch.tensor([[0.0, -1.0, -2.0, -0.5]])
    teacher = torch.tensor([[0.0, -1.5, -1.0, -0.5]])
    policy = torch.tensor([[0.0, -0.8, -2.5, -0.7]])
    tokens, ones = torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 4, dtype=torch.long)
    batch = Rollouts(tokens, ones, mask, 1, sampler, tokens[:, 0], teacher_lp_BT=teacher)
    settings = ObjectiveConfig()
    assert torch.equal(kl_and_reward_advantages(batch, settings, 1), -(sampler - teacher) * mask)
    fresh = kl_and_reward_advantages(replace(batch, policy_lp_BT=policy), settings, 1)
    assert torch.equal(fresh, -(policy - teacher) * mask)
    # The two advantages differ by (policy - sampler): the sampler's k_t rewards tokens the
    # policy already made likelier than the sampler did, whatever the teacher says.
    stale = kl_and_reward_advantages(batch, settings, 1)
    assert torch.allclose(stale - fresh, (policy - sampler) * mask)
