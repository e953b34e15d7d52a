"""PairMetrics against torch statistics; ties count as wrong."""

from __future__ import annotations

import pytest
import torch


def test_pair_metrics_count_ties_as_wrong_and_match_torch_statistics():
    from lit_rlhf.metrics import PairMetrics

    metric = PairMetrics()
    metric.update(torch.tensor([1.0, 2.0]), torch.tensor([0.0, 2.0]))  # a win and a tie
    metric.update(torch.tensor([-1.0]), torch.tensor([3.0]))  # a loss
    out = metric.compute()
    scores = torch.tensor([1.0, 2.0, 0.0, 2.0, -1.0, 3.0])
    assert out["accuracy"].item() == pytest.approx(1 / 3)
    assert out["margin"].item() == pytest.approx((1 + 0 - 4) / 3)
    assert out["reward_mean"].item() == pytest.approx(scores.mean().item())
    assert out["reward_std"].item() == pytest.approx(scores.std(unbiased=False).item())
