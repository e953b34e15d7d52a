"""PPO clipped losses against naive elementwise loops and hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from lit_rlhf.objectives.policy import policy_loss, value_loss


def _policy_naive(logp, old_logp, adv, mask, eps):
    losses, clipped_count, kls, ratios = [], 0, [], []
    for b in range(logp.shape[0]):
        for t in range(logp.shape[1]):
            if not mask[b, t]:
                continue
            r = math.exp(logp[b, t].item() - old_logp[b, t].item())
            a = adv[b, t].item()
            unclipped = -a * r
            clipped = -a * min(max(r, 1 - eps), 1 + eps)
            losses.append(max(unclipped, clipped))
            clipped_count += clipped > unclipped
            kls.append(0.5 * (logp[b, t].item() - old_logp[b, t].item()) ** 2)
            ratios.append(r)
    n = len(losses)
    return sum(losses) / n, clipped_count / n, sum(kls) / n, sum(ratios) / n, max(ratios)


def _value_naive(v, old_v, ret, mask, eps):
    losses, clipped_count, vs, errs = [], 0, [], []
    for b in range(v.shape[0]):
        for t in range(v.shape[1]):
            if not mask[b, t]:
                continue
            vv, o, r = v[b, t].item(), old_v[b, t].item(), ret[b, t].item()
            vc = min(max(vv, o - eps), o + eps)
            e1, e2 = (vv - r) ** 2, (vc - r) ** 2
            losses.append(max(e1, e2))
            clipped_count += e2 > e1
            vs.append(vv)
            errs.append(e1)
    n = len(losses)
    return 0.5 * sum(losses) / n, clipped_count / n, sum(vs) / n, sum(errs) / n


def test_policy_loss_hand_values_clip_active_for_both_signs():
    eps = 0.2
    ratios = torch.tensor([[1.5, 0.5, 0.5, 1.5, 1.0]])
    old_logp = torch.tensor([[-1.0, -2.0, -0.3, -0.7, -1.1]])
    logp = (old_logp + ratios.log()).requires_grad_()
    adv = torch.tensor([[1.0, -1.0, 2.0, -2.0, 123.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0]])
    loss, stats = policy_loss(logp, old_logp, adv, mask, eps)
    # token: A, r       -A*r   -A*clip(r)   max    clipped branch active?
    #   0:  +1, 1.5    -1.5   -1.2         -1.2   yes (A > 0, r > 1 + eps)
    #   1:  -1, 0.5     0.5    0.8          0.8   yes (A < 0, r < 1 - eps)
    #   2:  +2, 0.5    -1.0   -1.6         -1.0   no  (pessimistic: unclipped)
    #   3:  -2, 1.5     3.0    2.4          3.0   no
    assert_close(loss, torch.tensor((-1.2 + 0.8 - 1.0 + 3.0) / 4))  # 0.4
    assert_close(stats.clipfrac, torch.tensor(0.5))
    # 0.5 * (ln 1.5)^2 = 0.0822010, 0.5 * (ln 2)^2 = 0.2402265 -> mean 0.1612138
    assert_close(stats.approx_kl, torch.tensor(0.1612138))
    assert_close(stats.ratio_mean, torch.tensor(1.0))
    assert_close(stats.ratio_max, torch.tensor(1.5))
    loss.backward()
    # Clipped tokens get no gradient; unclipped ones d/dlogp (-A r)/4 = -A r / 4.
    assert_close(logp.grad, torch.tensor([[0.0, 0.0, -0.25, 0.75, 0.0]]))


def test_policy_loss_ratio_exactly_one():
    g = torch.Generator().manual_seed(0)
    logp = torch.randn(3, 4, generator=g)
    adv = torch.randn(3, 4, generator=g)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
    loss, stats = policy_loss(logp, logp.clone(), adv, mask, 0.2)
    expected = -(adv[mask].sum() / mask.sum())
    assert_close(loss, expected)
    assert stats.clipfrac.item() == 0.0
    assert stats.approx_kl.item() == 0.0
    assert stats.ratio_mean.item() == 1.0
    assert stats.ratio_max.item() == 1.0


def test_policy_loss_matches_naive_loop_and_padding_garbage_is_harmless():
    g = torch.Generator().manual_seed(1)
    old_logp = -torch.rand(4, 7, generator=g, dtype=torch.float64) * 3
    logp = (old_logp + torch.randn(4, 7, generator=g, dtype=torch.float64) * 0.3).requires_grad_()
    adv = torch.randn(4, 7, generator=g, dtype=torch.float64)
    mask = torch.arange(7) < torch.tensor([[7], [3], [5], [1]])
    with torch.no_grad():
        old_logp[~mask] = -1e4  # exp(logp - old_logp) would overflow
        adv[~mask] = float("nan")
    loss, stats = policy_loss(logp, old_logp, adv, mask.double(), 0.1)
    exp_loss, exp_cf, exp_kl, exp_rmean, exp_rmax = _policy_naive(logp, old_logp, adv, mask, 0.1)
    assert 0 < exp_cf < 1  # the data exercise both branches
    assert_close(loss, torch.tensor(exp_loss, dtype=torch.float64))
    assert_close(stats.clipfrac, torch.tensor(exp_cf, dtype=torch.float64))
    assert_close(stats.approx_kl, torch.tensor(exp_kl, dtype=torch.float64))
    assert_close(stats.ratio_mean, torch.tensor(exp_rmean, dtype=torch.float64))
    assert_close(stats.ratio_max, torch.tensor(exp_rmax, dtype=torch.float64))
    loss.backward()
    assert torch.isfinite(logp.grad).all()
    assert (logp.grad[~mask] == 0).all()
    assert not stats.approx_kl.requires_grad


def test_value_loss_hand_values():
    eps = 0.2
    values = torch.tensor([[1.5, 1.5, -0.1, 42.0]], requires_grad=True)
    old_values = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    returns = torch.tensor([[2.0, 1.0, 0.5, -42.0]])
    mask = torch.tensor([[True, True, True, False]])
    loss, stats = value_loss(values, old_values, returns, mask, eps)
    # token: v, old, R      v_clip  (v-R)^2  (v_clip-R)^2  max   clipped active?
    #   0:  1.5, 1.0, 2.0   1.2     0.25     0.64          0.64  yes
    #   1:  1.5, 1.0, 1.0   1.2     0.25     0.04          0.25  no
    #   2: -0.1, 0.0, 0.5  -0.1     0.36     0.36          0.36  no (equal, not larger)
    assert_close(loss, torch.tensor(0.5 * (0.64 + 0.25 + 0.36) / 3))  # 0.2083333
    assert_close(stats.clipfrac, torch.tensor(1.0 / 3.0))
    assert_close(stats.value_mean, torch.tensor(2.9 / 3.0))
    assert_close(stats.value_mse, torch.tensor(0.86 / 3.0))
    loss.backward()
    # token 0: clipped branch, v beyond old + eps -> no gradient; token 1: (v - R)/3 = 1/6;
    # token 2: both branches equal, torch.maximum splits the gradient: (v - R)/3 = -0.2
    assert_close(values.grad, torch.tensor([[0.0, 0.5 / 3, -0.2, 0.0]]))


def test_value_loss_matches_naive_loop():
    g = torch.Generator().manual_seed(2)
    old_v = torch.randn(3, 6, generator=g, dtype=torch.float64)
    v = old_v + torch.randn(3, 6, generator=g, dtype=torch.float64) * 0.5
    ret = torch.randn(3, 6, generator=g, dtype=torch.float64)
    mask = torch.arange(6) < torch.tensor([[6], [2], [4]])
    ret[~mask] = float("nan")
    loss, stats = value_loss(v, old_v, ret, mask, 0.2)
    exp_loss, exp_cf, exp_vmean, exp_mse = _value_naive(v, old_v, ret, mask, 0.2)
    assert 0 < exp_cf < 1
    assert_close(loss, torch.tensor(exp_loss, dtype=torch.float64))
    assert_close(stats.clipfrac, torch.tensor(exp_cf, dtype=torch.float64))
    assert_close(stats.value_mean, torch.tensor(exp_vmean, dtype=torch.float64))
    assert_close(stats.value_mse, torch.tensor(exp_mse, dtype=torch.float64))


def test_value_loss_without_clipping_is_half_mse():
    values = torch.tensor([[3.0, 0.0]])
    returns = torch.tensor([[1.0, 1.0]])
    loss, stats = value_loss(values, torch.zeros(1, 2), returns, torch.ones(1, 2), math.inf)
    assert_close(loss, torch.tensor(0.5 * (4.0 + 1.0) / 2))
    assert stats.clipfrac.item() == 0.0


@pytest.mark.parametrize("fn,name", [(policy_loss, "clip_range"), (value_loss, "clip_range_value")])
def test_negative_clip_range_raises(fn, name):
    x = torch.zeros(1, 2)
    with pytest.raises(ValueError, match=name):
        fn(x, x, x, torch.ones(1, 2), -0.1)


def test_clip_range_high_raises_only_the_upper_bound():
    # ratio 1.25 with A = +1: clipped at 1.2 by eps = 0.2, not clipped by eps_high = 0.28.
    # ratio 0.7 with A = -1: clipped at the lower bound 0.8 either way (-A * 0.8 = 0.8 > 0.7).
    logp = torch.log(torch.tensor([[1.25, 0.7]]))
    old, adv, mask = torch.zeros(1, 2), torch.tensor([[1.0, -1.0]]), torch.ones(1, 2)
    sym, _ = policy_loss(logp, old, adv, mask, clip_range=0.2)
    high, stats = policy_loss(logp, old, adv, mask, clip_range=0.2, clip_range_high=0.28)
    assert sym.item() == pytest.approx((-1.2 + 0.8) / 2)
    assert high.item() == pytest.approx((-1.25 + 0.8) / 2)
    assert stats.clipfrac.item() == pytest.approx(0.5)


def test_loss_aggregations_hand_values():
    from lit_rlhf.objectives.masked import aggregate

    # Sequence 1: tokens 1, 2, 3; sequence 2: token 6 (the rest masked out, holding garbage).
    x = torch.tensor([[1.0, 2.0, 3.0], [6.0, float("nan"), 100.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    assert aggregate(x, mask, "token_mean").item() == pytest.approx(12 / 4)
    assert aggregate(x, mask, "seq_mean_token_mean").item() == pytest.approx((2 + 6) / 2)
    assert aggregate(x, mask, "seq_mean_token_sum").item() == pytest.approx((6 + 6) / 2)
    with pytest.raises(ValueError, match="loss aggregation must be"):
        aggregate(x, mask, "sum")
    # The policy loss reduces its per-token terms the same way (ratio 1: the loss is -mean A).
    adv = torch.tensor([[1.0, 1.0, 1.0], [4.0, 0.0, 0.0]])
    loss, _ = policy_loss(torch.zeros(2, 3), torch.zeros(2, 3), adv, mask, 0.2, aggregation="seq_mean_token_mean")
    assert loss.item() == pytest.approx(-(1 + 4) / 2)
