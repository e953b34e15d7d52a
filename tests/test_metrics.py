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


def test_distinct_n_counts_unique_word_ngrams_over_all():
    from lit_rlhf.metrics import distinct_n, unique_fraction

    # bigrams: (a b) (b a) (a b) | (a b) ; "c" has none -> 2 unique of 4
    assert distinct_n(["a b a b", "a b", "c"], 2) == 2 / 4
    assert distinct_n(["x y z", "u v w"], 2) == 1.0
    assert distinct_n(["I would recommend it."] * 5, 2) == 3 / 15  # collapse onto one stock ending
    assert distinct_n(["one", ""], 2) == 0.0
    assert distinct_n(["a b c"], 1) == 1.0 and distinct_n(["a a a"], 1) == 1 / 3
    assert unique_fraction(["a", "a ", "b", "c"]) == 3 / 4 and unique_fraction([]) == 0.0
