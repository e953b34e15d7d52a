"""lit_rlhf.ops against naive loops, hand-computed numbers and a simulated two-rank all-reduce."""

from __future__ import annotations

import math
import threading

import pytest
import torch
from torch.testing import assert_close

from lit_rlhf.ops import (
    compute_rewards,
    entropy_from_logits,
    explained_variance,
    gae,
    kl_penalty,
    logprobs_and_entropy,
    logprobs_from_logits,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
)


def _ragged_mask(lengths, T, dtype=torch.float32):
    return (torch.arange(T) < torch.tensor(lengths).unsqueeze(1)).to(dtype)


# ----------------------------------------------------------------------------------- log-probs


def test_logprobs_match_log_softmax_gather():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 11, generator=g, dtype=torch.float64) * 4
    labels = torch.randint(0, 11, (3, 5), generator=g)
    expected = torch.log_softmax(logits, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    out = logprobs_from_logits(logits, labels)
    assert out.dtype == torch.float64
    assert_close(out, expected)


def test_logprobs_hand_value_and_gradient():
    # logits (0, ln 3) -> p = (1/4, 3/4)
    logits = torch.tensor([[[0.0, math.log(3.0)]]], requires_grad=True)
    out = logprobs_from_logits(logits, torch.tensor([[1]]))
    assert_close(out, torch.tensor([[math.log(0.75)]]))
    out.sum().backward()
    # d log p_1 / d logits = onehot(1) - p
    assert_close(logits.grad, torch.tensor([[[-0.25, 0.25]]]))


def test_logprobs_bf16_are_computed_in_float32():
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(2, 4, 1000, generator=g) * 3).to(torch.bfloat16)
    labels = torch.randint(0, 1000, (2, 4), generator=g)
    out = logprobs_from_logits(logits, labels)
    assert out.dtype == torch.float32
    ref = torch.log_softmax(logits.double(), -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    # The bf16 inputs are exact in float32, so only float32 rounding separates the two.
    assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


def test_entropy_hand_values_and_against_definition():
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [0.0, math.log(3.0), -1e4, -1e4]]])
    # uniform over 4 -> ln 4; (1/4, 3/4, ~0, ~0) -> -(1/4 ln 1/4 + 3/4 ln 3/4)
    expected = torch.tensor([[math.log(4), -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))]])
    assert_close(entropy_from_logits(logits), expected)
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 3, 7, generator=g, dtype=torch.float64)
    p = torch.softmax(logits, -1)
    assert_close(entropy_from_logits(logits), -(p * p.log()).sum(-1))


def test_logprobs_and_entropy_share_one_pass_and_detach_on_request():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 3, 7, generator=g, requires_grad=True)
    labels = torch.randint(0, 7, (2, 3), generator=g)
    logp, ent = logprobs_and_entropy(logits, labels)
    assert_close(logp, logprobs_from_logits(logits, labels))
    assert_close(ent, entropy_from_logits(logits))
    assert ent.requires_grad
    logp_d, ent_d = logprobs_and_entropy(logits, labels, entropy="detached")
    assert logp_d.requires_grad and not ent_d.requires_grad
    assert_close(ent_d, ent.detach())
    assert logprobs_and_entropy(logits, labels, entropy="skip")[1] is None


# --------------------------------------------------------------------------- masked statistics


def test_masked_stats_hand_values_ignore_padding_even_nan():
    x = torch.tensor([[2.0, 4.0, float("nan")], [6.0, 100.0, float("inf")]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert_close(masked_sum(x, mask), torch.tensor(12.0))
    assert_close(masked_mean(x, mask), torch.tensor(4.0))
    assert_close(masked_mean(x, mask, dim=1), torch.tensor([3.0, 6.0]))
    assert_close(masked_sum(x, mask, dim=0), torch.tensor([8.0, 4.0, 0.0]))
    assert_close(masked_mean(x, mask, dim=0), torch.tensor([4.0, 4.0, 0.0]))  # empty column: 0
    # deviations (-2, 0, 2): sum of squares 8
    assert_close(masked_var(x, mask), torch.tensor(4.0))
    assert_close(masked_var(x, mask, unbiased=False), torch.tensor(8.0 / 3.0))
    # bool and float masks agree
    assert_close(masked_var(x, mask.bool()), torch.tensor(4.0))


def test_masked_whiten_hand_values():
    x = torch.tensor([[2.0, 4.0, 6.0, 100.0]])
    mask = torch.tensor([[1, 1, 1, 0]], dtype=torch.bool)
    # mean 4, unbiased var 4 -> std 2
    assert_close(masked_whiten(x, mask), torch.tensor([[-1.0, 0.0, 1.0, 0.0]]))
    assert_close(masked_whiten(x, mask, shift_mean=False), torch.tensor([[3.0, 4.0, 5.0, 0.0]]))


def test_masked_whiten_random_has_zero_mean_unit_var_on_mask():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 9, generator=g) * 5 + 3
    mask = _ragged_mask([9, 4, 1, 6], 9)
    w = masked_whiten(x, mask)
    assert_close(masked_mean(w, mask), torch.tensor(0.0), atol=1e-6, rtol=0)
    assert_close(masked_var(w, mask), torch.tensor(1.0))
    assert torch.all(w[mask == 0] == 0)
    ws = masked_whiten(x, mask, shift_mean=False)
    assert_close(masked_mean(ws, mask), masked_mean(x, mask))
    assert_close(masked_var(ws, mask), torch.tensor(1.0))


def test_empty_mask_gives_zeros_not_nan():
    x = torch.randn(2, 3)
    mask = torch.zeros(2, 3)
    assert masked_mean(x, mask).item() == 0.0
    assert masked_var(x, mask).item() == 0.0
    assert torch.equal(masked_whiten(x, mask), torch.zeros(2, 3))


def test_mask_shape_mismatch_raises():
    with pytest.raises(ValueError, match="mask shape"):
        masked_mean(torch.zeros(2, 3), torch.ones(2, 4))


def test_group_sum_hook_makes_masked_mean_global():
    g = torch.Generator().manual_seed(4)
    xa, xb = torch.randn(2, 5, generator=g), torch.randn(3, 5, generator=g)
    ma, mb = _ragged_mask([5, 2], 5), _ragged_mask([1, 4, 3], 5)
    # "rank b" contributes its (sum, count) to the reduction
    other = torch.stack([masked_sum(xb, mb), mb.sum()])
    out = masked_mean(xa, ma, group_sum=lambda t: t + other)
    assert_close(out, masked_mean(torch.cat([xa, xb]), torch.cat([ma, mb])))


class _ThreadAllReduce:
    """all_reduce(SUM) between threads, each thread playing one rank."""

    def __init__(self, world_size: int) -> None:
        self.slots: list[torch.Tensor | None] = [None] * world_size
        self.barrier = threading.Barrier(world_size, timeout=10)

    def hook(self, rank: int):
        def all_reduce(t: torch.Tensor) -> torch.Tensor:
            self.slots[rank] = t.clone()
            self.barrier.wait()
            total = sum(self.slots[1:], self.slots[0].clone())  # same order on every rank
            self.barrier.wait()  # nobody overwrites a slot before everyone has read it
            return total

        return all_reduce


def test_group_sum_hook_simulating_two_ranks_whitens_like_the_concatenated_batch():
    g = torch.Generator().manual_seed(5)
    # Ranks see different batch sizes and lengths; the statistics must still be global.
    x0, m0 = torch.randn(2, 5, generator=g) * 3 + 1, _ragged_mask([5, 3], 5)
    x1, m1 = torch.randn(3, 7, generator=g) - 2, _ragged_mask([7, 1, 4], 7)
    reducer = _ThreadAllReduce(2)
    results: dict[int, tuple[torch.Tensor, ...]] = {}

    def run(rank, x, m):
        hook = reducer.hook(rank)
        results[rank] = (
            masked_whiten(x, m, group_sum=hook),
            masked_whiten(x, m, shift_mean=False, group_sum=hook),
            masked_var(x, m, group_sum=hook),
            explained_variance(torch.zeros_like(x), x, m, group_sum=hook),
        )

    threads = [threading.Thread(target=run, args=a) for a in [(0, x0, m0), (1, x1, m1)]]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert set(results) == {0, 1}

    pad = torch.full((2, 2), float("nan"))  # padding rank 0 to T=7 must not matter
    x_all = torch.cat([torch.cat([x0, pad], 1), x1])
    m_all = torch.cat([torch.cat([m0, torch.zeros(2, 2)], 1), m1])
    for shift, i in [(True, 0), (False, 1)]:
        expected = masked_whiten(x_all, m_all, shift_mean=shift)
        assert_close(results[0][i], expected[:2, :5])
        assert_close(results[1][i], expected[2:])
    # Every rank used the same statistics, bit for bit.
    assert torch.equal(results[0][2], results[1][2])
    assert_close(results[0][2], masked_var(x_all, m_all))
    assert torch.equal(results[0][3], results[1][3])
    # values = 0: explained variance exactly 0 up to rounding
    assert_close(results[0][3], torch.tensor(0.0), atol=1e-6, rtol=0)


def test_explained_variance_hand_values():
    returns = torch.tensor([[1.0, 2.0, 3.0, 50.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    # residuals (0, 0, 1): biased var 2/9; returns: biased var 2/3 -> 1 - 1/3
    values = torch.tensor([[1.0, 2.0, 2.0, -7.0]])
    assert_close(explained_variance(values, returns, mask), torch.tensor(2.0 / 3.0))
    assert_close(explained_variance(returns, returns, mask), torch.tensor(1.0))
    assert_close(explained_variance(torch.zeros_like(returns), returns, mask), torch.tensor(0.0))
    flat = torch.tensor([[2.0, 2.0, 2.0, 9.0]])
    assert torch.isnan(explained_variance(values, flat, mask))


# ------------------------------------------------------------------------------ KL and rewards


def test_kl_penalty_hand_values():
    logp = torch.tensor([[0.0, -1.0, -0.5]])
    ref = torch.tensor([[-1.0, 0.0, -0.5]])  # d = (1, -1, 0)
    assert_close(kl_penalty(logp, ref, "k1"), torch.tensor([[1.0, -1.0, 0.0]]))
    assert_close(kl_penalty(logp, ref, "abs"), torch.tensor([[1.0, 1.0, 0.0]]))
    assert_close(kl_penalty(logp, ref, "mse"), torch.tensor([[0.5, 0.5, 0.0]]))
    # exp(-1) - 1 + 1 = 0.367879..., exp(1) - 1 - 1 = e - 2 = 0.718281...
    assert_close(kl_penalty(logp, ref, "k3"), torch.tensor([[0.36787944, 0.71828183, 0.0]]))
    with pytest.raises(ValueError, match="kind"):
        kl_penalty(logp, ref, "k2")


def test_k3_is_never_negative():
    g = torch.Generator().manual_seed(6)
    d = torch.cat([
        torch.randn(4000, generator=g) * 5,
        torch.randn(4000, generator=g) * 1e-4,
        torch.randn(4000, generator=g) * 1e-8,
    ])
    ref = torch.randn(d.shape, generator=g) * 3 - 5
    k3 = kl_penalty(ref + d, ref, "k3")
    assert (k3 >= 0).all()
    assert (k3[:4000] > 0).any()


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


# ------------------------------------------------------------------------------------------ GAE


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
