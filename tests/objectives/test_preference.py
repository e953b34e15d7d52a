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
