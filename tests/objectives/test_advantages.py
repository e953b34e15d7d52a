"""GAE against hand-computed values and a naive per-row loop."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from lit_rlhf.objectives import (
    compute_rewards,
    gae,
)


def _ragged_mask(lengths, T, dtype=torch.float32):
    return (torch.arange(T) < torch.tensor(lengths).unsqueeze(1)).to(dtype)


def test_gae_hand_computed():
    gamma, lam = 0.9, 0.8  # gamma * lam = 0.72
    rewards = torch.tensor([[0.0, 0.0, 1.0, 5.0], [0.5, -1.0, 3.0, 3.0]])
    values = torch.tensor([[0.5, 0.4, 0.3, 9.0], [0.2, -0.1, 4.0, 4.0]])  # padding: garbage
    mask = _ragged_mask([3, 2], 4)
    adv, ret = gae(rewards, values, mask, gamma, lam)
    # row 0, V = 0 after t = 2:
    #   d2 = 1 + 0.9*0 - 0.3 = 0.7                  A2 = 0.7
    #   d1 = 0 + 0.9*0.3 - 0.4 = -0.13              A1 = -0.13 + 0.72*0.7 = 0.374
    #   d0 = 0 + 0.9*0.4 - 0.5 = -0.14              A0 = -0.14 + 0.72*0.374 = 0.12928
    # row 1, V = 0 after t = 1:
    #   d1 = -1 + 0 + 0.1 = -0.9                    A1 = -0.9
    #   d0 = 0.5 + 0.9*(-0.1) - 0.2 = 0.21          A0 = 0.21 + 0.72*(-0.9) = -0.438
    expected_adv = torch.tensor([[0.12928, 0.374, 0.7, 0.0], [-0.438, -0.9, 0.0, 0.0]])
    expected_ret = torch.tensor([[0.62928, 0.774, 1.0, 0.0], [-0.238, -1.0, 0.0, 0.0]])
    assert_close(adv, expected_adv)
    assert_close(ret, expected_ret)


def _gae_naive(rewards, values, lengths, gamma, lam):
    B, T = rewards.shape
    adv, ret = torch.zeros(B, T, dtype=torch.float64), torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        n = lengths[b]
        r = rewards[b, :n].tolist()
        v = values[b, :n].tolist()
        running = 0.0
        for t in reversed(range(n)):
            next_v = v[t + 1] if t + 1 < n else 0.0
            running = r[t] + gamma * next_v - v[t] + gamma * lam * running
            adv[b, t] = running
            ret[b, t] = running + v[t]
    return adv, ret


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.99, 1.0), (0.7, 0.3)])
def test_gae_matches_naive_per_row_loop(gamma, lam):
    g = torch.Generator().manual_seed(8)
    lengths = [9, 1, 5, 0, 7]
    rewards = torch.randn(5, 9, generator=g, dtype=torch.float64)
    values = torch.randn(5, 9, generator=g, dtype=torch.float64)
    mask = _ragged_mask(lengths, 9, torch.bool)
    rewards[~mask] = float("nan")  # padding is never read
    values[~mask] = 1e6
    adv, ret = gae(rewards, values, mask, gamma, lam)
    exp_adv, exp_ret = _gae_naive(rewards, values, lengths, gamma, lam)
    assert_close(adv, exp_adv)
    assert_close(ret, exp_ret)


def test_gae_with_gamma_lam_one_is_reward_to_go_minus_value():
    rewards = torch.tensor([[1.0, 2.0, 3.0]])
    values = torch.tensor([[0.5, 0.5, 0.5]])
    adv, ret = gae(rewards, values, torch.ones(1, 3), 1.0, 1.0)
    assert_close(ret, torch.tensor([[6.0, 5.0, 3.0]]))
    assert_close(adv, torch.tensor([[5.5, 4.5, 2.5]]))


def test_gae_and_rewards_are_detached():
    values = torch.randn(2, 3, requires_grad=True)
    adv, ret = gae(torch.randn(2, 3), values, torch.ones(2, 3), 1.0, 0.95)
    assert not adv.requires_grad and not ret.requires_grad
    logp = torch.randn(2, 3, requires_grad=True)
    out = compute_rewards(torch.zeros(2), logp, torch.zeros(2, 3), torch.ones(2, 3), 0.1)
    assert not out.rewards.requires_grad


def test_group_estimators_hand_values():
    from lit_rlhf.objectives.advantages import (
        group_advantages,
        reinforce_baseline_advantages,
        rloo_advantages,
        zero_std_groups,
    )

    # Two prompts, G = 3: rewards (1, 2, 3) and (5, 5, 5).
    r = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0])
    # Group 1: mean 2, unbiased std 1 -> (-1, 0, 1) / (1 + eps); group 2: all equal -> 0.
    assert group_advantages(r, 3, eps=0.0)[:3].tolist() == pytest.approx([-1.0, 0.0, 1.0])
    assert group_advantages(r, 3).tolist()[3:] == [0.0, 0.0, 0.0]
    assert group_advantages(r, 3, scale="none").tolist() == pytest.approx([-1, 0, 1, 0, 0, 0])  # Dr. GRPO
    batch_std = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0]).std().item()
    assert group_advantages(r, 3, scale="batch", eps=0.0).tolist() == pytest.approx(
        [-1 / batch_std, 0, 1 / batch_std, 0, 0, 0])
    # RLOO: 1 - mean(2, 3) = -1.5, 2 - 2 = 0, 3 - 1.5 = 1.5; = 3/2 * (r - mean).
    assert rloo_advantages(r, 3).tolist() == pytest.approx([-1.5, 0.0, 1.5, 0.0, 0.0, 0.0])
    # REINFORCE++: centred (-1, 0, 1, 0, 0, 0), mean 0, unbiased std sqrt(2/5).
    s = (2 / 5) ** 0.5
    assert reinforce_baseline_advantages(r, 3).tolist() == pytest.approx([-1 / s, 0, 1 / s, 0, 0, 0], rel=1e-6)
    assert zero_std_groups(r, 3) == 1


def test_group_estimators_match_a_naive_loop():
    from lit_rlhf.objectives.advantages import group_advantages, rloo_advantages

    g = torch.Generator().manual_seed(0)
    r = torch.randn(5 * 4, generator=g)
    want_grpo, want_rloo = [], []
    for k in range(5):
        group = r[4 * k : 4 * k + 4].tolist()
        mean = sum(group) / 4
        std = (sum((x - mean) ** 2 for x in group) / 3) ** 0.5
        want_grpo += [(x - mean) / (std + 1e-4) for x in group]
        want_rloo += [x - (sum(group) - x) / 3 for x in group]
    assert group_advantages(r, 4).tolist() == pytest.approx(want_grpo, rel=1e-5)
    assert rloo_advantages(r, 4).tolist() == pytest.approx(want_rloo, rel=1e-5)


def test_groups_must_divide_the_batch():
    from lit_rlhf.objectives.advantages import group_advantages

    with pytest.raises(ValueError, match=r"rewards of shape \(7,\) do not split into groups of 4"):
        group_advantages(torch.zeros(7), 4)
    with pytest.raises(ValueError, match="scale must be group, batch or none"):
        group_advantages(torch.zeros(8), 4, scale="prompt")
