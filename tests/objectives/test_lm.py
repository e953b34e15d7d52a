"""The causal-LM loss and the summed cross-entropy against naive loops and hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

import lit_rlhf.objectives.lm as losses
from lit_rlhf.objectives.lm import causal_lm_loss, cross_entropy_sum


def test_causal_lm_loss_matches_a_naive_loop():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 7, generator=g)
    labels = torch.randint(0, 7, (2, 5), generator=g)
    labels[0, 2] = -100
    labels[1, 0] = -100  # position 0 is never a target anyway
    total, count, correct = 0.0, 0, 0
    for b in range(2):
        for t in range(4):  # position t predicts label t + 1
            y = labels[b, t + 1].item()
            if y == -100:
                continue
            total += -torch.log_softmax(logits[b, t], -1)[y].item()
            count += 1
            correct += int(logits[b, t].argmax().item() == y)
    stats = causal_lm_loss(logits, labels, count_correct=True)
    assert stats.n_tokens.item() == count == 7
    assert stats.n_correct.item() == correct
    assert stats.loss.item() == pytest.approx(total / count, rel=1e-6)
    assert causal_lm_loss(logits, labels).n_correct is None  # training skips the argmax pass


def test_causal_lm_loss_hand_value_and_all_masked():
    # Uniform logits over V=4: loss is log(4) for every counted token.
    logits = torch.zeros(1, 3, 4)
    labels = torch.tensor([[1, 2, -100]])
    assert causal_lm_loss(logits, labels).loss.item() == pytest.approx(math.log(4))
    empty = causal_lm_loss(logits, torch.full((1, 3), -100))
    assert empty.loss.item() == 0.0 and empty.n_tokens.item() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk_rows", [None, 3], ids=["one-chunk", "chunks-of-3-rows"])
def test_cross_entropy_sum_equals_float32_cross_entropy_in_value_and_gradient(monkeypatch, dtype, chunk_rows):
    if chunk_rows is not None:  # several chunks, the last one short (10 rows)
        monkeypatch.setattr(losses, "_CHUNK_ELEMENTS", chunk_rows * 11)
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(10, 11, generator=g) * 4).to(dtype)
    targets = torch.randint(0, 11, (10,), generator=g)
    targets[[1, 6]] = -100
    ours = logits.clone().requires_grad_()
    ref = logits.clone().requires_grad_()
    loss = cross_entropy_sum(ours, targets)
    expected = torch.nn.functional.cross_entropy(ref.float(), targets, reduction="sum")
    (0.5 * loss).backward()
    (0.5 * expected).backward()
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-5)
    assert ours.grad.dtype == dtype
    # The float32 gradient, rounded once to the logits' dtype; ignored rows get exactly 0.
    torch.testing.assert_close(ours.grad, ref.grad, rtol=1e-5, atol=1e-6)
    assert ours.grad[[1, 6]].abs().sum() == 0


def test_cross_entropy_sum_ignores_non_finite_ignored_rows_and_the_default_dtype():
    logits = torch.randn(4, 5, generator=torch.Generator().manual_seed(0))
    targets = torch.tensor([1, -100, 3, 0])
    logits[1] = float("nan")  # an ignored row (e.g. garbage past the end of a sequence)
    expected = torch.nn.functional.cross_entropy(logits[[0, 2, 3]], targets[[0, 2, 3]], reduction="sum")
    torch.testing.assert_close(cross_entropy_sum(logits, targets), expected)
    # The backward's float32 buffers do not follow torch's default dtype.
    x = logits[[0, 2, 3]].clone().requires_grad_()
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        cross_entropy_sum(x, targets[[0, 2, 3]]).backward()
    finally:
        torch.set_default_dtype(default)
    ref = logits[[0, 2, 3]].clone().requires_grad_()
    torch.nn.functional.cross_entropy(ref, targets[[0, 2, 3]], reduction="sum").backward()
    torch.testing.assert_close(x.grad, ref.grad)
