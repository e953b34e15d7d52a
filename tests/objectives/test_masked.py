"""Masked statistics against naive loops, hand-computed numbers and a simulated two-rank all-reduce."""

from __future__ import annotations

import threading

import pytest
import torch
from torch.testing import assert_close

from lit_rlhf.objectives import (
    explained_variance,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
)


def _ragged_mask(lengths, T, dtype=torch.float32):
    return (torch.arange(T) < torch.tensor(lengths).unsqueeze(1)).to(dtype)


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
