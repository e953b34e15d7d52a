"""Per-token rewards (KL penalty + score at the last token) against hand values and a loop."""

from __future__ import annotations

import math

import torch
from torch.testing import assert_close

from lit_rlhf.objectives import (
    compute_rewards,
)


def _ragged_mask(lengths, T, dtype=torch.float32):
    return (torch.arange(T) < torch.tensor(lengths).unsqueeze(1)).to(dtype)


def test_compute_rewards_hand_values_ragged_rows():
    logp = torch.tensor([[-1.0, -2.0, -0.5, 7.0], [-0.2, 3.0, 3.0, 3.0], [9.0, 9.0, 9.0, 9.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.5, -7.0], [-0.7, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    mask = _ragged_mask([3, 1, 0], 4, torch.bool)
    scores = torch.tensor([2.0, -1.0, 5.0])
    out = compute_rewards(scores, logp, ref, mask, kl_coef=0.1)
    # k1: row 0 d = (0.5, -1, 0); row 1 d = (0.5); row 2 empty
    kl = torch.tensor([[0.5, -1.0, 0.0, 0.0], [0.5, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    nsr = torch.tensor([[-0.05, 0.1, 0.0, 0.0], [-0.05, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    rewards = torch.tensor([[-0.05, 0.1, 2.0, 0.0], [-1.05, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    assert_close(out.kl, kl)
    assert_close(out.non_score_reward, nsr)
    assert_close(out.rewards, rewards)


def test_compute_rewards_against_loop_with_k3():
    g = torch.Generator().manual_seed(7)
    lengths = [6, 2, 5, 1]
    logp = torch.randn(4, 6, generator=g)
    ref = torch.randn(4, 6, generator=g)
    scores = torch.randn(4, generator=g)
    mask = _ragged_mask(lengths, 6)
    out = compute_rewards(scores, logp, ref, mask, kl_coef=0.3, kl_kind="k3")
    expected = torch.zeros(4, 6)
    for b, n in enumerate(lengths):
        for t in range(n):
            d = (logp[b, t] - ref[b, t]).item()
            expected[b, t] = -0.3 * (math.exp(-d) - 1 + d)
        expected[b, n - 1] += scores[b]
    assert_close(out.rewards, expected)
