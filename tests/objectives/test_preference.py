"""The pairwise reward-model loss against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch


def test_pairwise_loss_hand_values():
    from lit_rlhf.objectives.preference import pairwise_loss

    rc, rr = torch.tensor([2.0, 0.0, 1.0]), torch.tensor([0.0, 0.0, 3.0])
    # -log(sigmoid(d)) = log(1 + exp(-d)) for d = 2, 0, -2
    want = (math.log1p(math.exp(-2)) + math.log(2) + math.log1p(math.exp(2))) / 3
    out = pairwise_loss(rc, rr)
    assert out.loss.item() == pytest.approx(want, rel=1e-6)
    assert out.accuracy.item() == pytest.approx(1 / 3)  # the tie (0, 0) counts as wrong
    assert out.margin.item() == pytest.approx(0.0)

    margin = torch.tensor([1.0, 0.5, 0.0])  # d - m = 1, -0.5, -2
    want_m = (math.log1p(math.exp(-1)) + math.log1p(math.exp(0.5)) + math.log1p(math.exp(2))) / 3
    assert pairwise_loss(rc, rr, margin).loss.item() == pytest.approx(want_m, rel=1e-6)

    centered = pairwise_loss(rc, rr, center_coef=0.01).loss.item()
    assert centered == pytest.approx(want + 0.01 * (4 + 0 + 16) / 3, rel=1e-6)


def test_pairwise_loss_gradient_pushes_scores_apart():
    from lit_rlhf.objectives.preference import pairwise_loss

    rc = torch.tensor([0.5], requires_grad=True)
    rr = torch.tensor([0.5], requires_grad=True)
    pairwise_loss(rc, rr).loss.backward()
    assert rc.grad.item() == pytest.approx(-0.5) and rr.grad.item() == pytest.approx(0.5)


def _softplus(x: float) -> float:  # -log(sigmoid(-x))
    return math.log1p(math.exp(x))


def test_dpo_losses_hand_values():
    from lit_rlhf.objectives.preference import dpo_loss

    # Pair 1: policy gains 3 nats on chosen, loses 1 on rejected vs the reference: h = 4.
    # Pair 2: h = (-1 - 0) - (0 - 0) = -1.  Pair 3: h = 0 (a tie).
    lc, lr = torch.tensor([-7.0, -11.0, -5.0]), torch.tensor([-9.0, -8.0, -6.0])
    rc, rr = torch.tensor([-10.0, -10.0, -5.0]), torch.tensor([-8.0, -8.0, -6.0])
    h = [4.0, -1.0, 0.0]
    beta = 0.5
    out = dpo_loss(lc, lr, rc, rr, beta=beta)
    assert out.loss.item() == pytest.approx(sum(_softplus(-beta * x) for x in h) / 3, rel=1e-6)
    assert out.reward_chosen.tolist() == pytest.approx([1.5, -0.5, 0.0])
    assert out.reward_rejected.tolist() == pytest.approx([-0.5, 0.0, 0.0])
    assert out.accuracy.item() == pytest.approx(1 / 3)  # the tie counts as wrong

    ls = 0.1  # conservative DPO
    want = sum((1 - ls) * _softplus(-beta * x) + ls * _softplus(beta * x) for x in h) / 3
    assert dpo_loss(lc, lr, rc, rr, beta=beta, label_smoothing=ls).loss.item() == pytest.approx(want, rel=1e-6)
    want = sum((x - 1 / (2 * beta)) ** 2 for x in h) / 3  # IPO
    assert dpo_loss(lc, lr, rc, rr, beta=beta, loss_type="ipo").loss.item() == pytest.approx(want, rel=1e-6)
    want = sum(max(0.0, 1 - beta * x) for x in h) / 3  # hinge
    assert dpo_loss(lc, lr, rc, rr, beta=beta, loss_type="hinge").loss.item() == pytest.approx(want, rel=1e-6)
    # Reference-free: h = logp_c - logp_r = 2, -3, 1.
    want = sum(_softplus(-beta * x) for x in (2.0, -3.0, 1.0)) / 3
    assert dpo_loss(lc, lr, None, None, beta=beta).loss.item() == pytest.approx(want, rel=1e-6)
    # RPO: plus the chosen side's NLL.
    nll = torch.tensor([1.0, 2.0, 3.0])
    base = dpo_loss(lc, lr, rc, rr, beta=beta).loss.item()
    assert dpo_loss(lc, lr, rc, rr, beta=beta, nll_chosen=nll, nll_coef=0.5).loss.item() == pytest.approx(base + 1.0)
    # SimPO's margin gamma: -logsigmoid(beta * h - gamma), here without a reference.
    want = sum(_softplus(-(beta * x - 0.3)) for x in (2.0, -3.0, 1.0)) / 3
    assert dpo_loss(lc, lr, None, None, beta=beta, target_margin=0.3).loss.item() == pytest.approx(want, rel=1e-6)


def test_dpo_loss_at_the_reference_is_log2_and_its_gradient_favours_chosen():
    from lit_rlhf.objectives.preference import dpo_loss

    lc = torch.tensor([-4.0, -2.0], requires_grad=True)
    lr = torch.tensor([-3.0, -5.0], requires_grad=True)
    out = dpo_loss(lc, lr, lc.detach(), lr.detach(), beta=0.1)  # policy == reference: h = 0
    assert out.loss.item() == pytest.approx(math.log(2), rel=1e-6)
    out.loss.backward()
    assert (lc.grad < 0).all() and (lr.grad > 0).all()  # descent raises chosen, lowers rejected
    assert lc.grad.tolist() == pytest.approx([-0.1 * 0.5 / 2] * 2)  # d/dlc = -beta * sigmoid(0) / B


@pytest.mark.parametrize("kwargs, match", [
    (dict(beta=0.0), "beta must be > 0"),
    (dict(loss_type="kto"), "unknown loss_type 'kto'"),
    (dict(label_smoothing=0.5), "label_smoothing must be in"),
    (dict(nll_coef=1.0), "nll_coef > 0 needs nll_chosen"),
    (dict(target_margin=-0.1), "target_margin must be >= 0"),
    (dict(target_margin=0.5, loss_type="ipo"), "is for loss_type sigmoid"),
])
def test_dpo_loss_refuses_bad_settings(kwargs, match):
    from lit_rlhf.objectives.preference import dpo_loss

    x = torch.zeros(2)
    with pytest.raises(ValueError, match=match):
        dpo_loss(x, x, x, x, **kwargs)
