"""Pure functions: causal LM loss and the LR schedule, against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

import lit_rlhf.losses as losses
from lit_rlhf.losses import causal_lm_loss, cross_entropy_sum
from lit_rlhf.optim import OptimConfig, warmup_cosine


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


def test_warmup_cosine_schedule():
    # warmup 4 steps, 14 total, floor 0.1
    assert [warmup_cosine(s, 4, 14, 0.1) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert warmup_cosine(4, 4, 14, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(9, 4, 14, 0.1) == pytest.approx(0.1 + 0.9 * 0.5)  # half way: cos = 0
    assert warmup_cosine(14, 4, 14, 0.1) == pytest.approx(0.1)
    assert warmup_cosine(100, 4, 14, 0.1) == pytest.approx(0.1)


@pytest.mark.parametrize("kwargs, field", [(dict(lr=0), "optim.lr"), (dict(warmup_steps=-1), "warmup_steps"),
                                           (dict(min_lr_ratio=2), "min_lr_ratio")])
def test_optim_config_errors(kwargs, field):
    with pytest.raises(ValueError, match=field):
        OptimConfig(**kwargs)


def test_pairwise_loss_hand_values():
    from lit_rlhf.losses import pairwise_loss

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
    from lit_rlhf.losses import pairwise_loss

    rc = torch.tensor([0.5], requires_grad=True)
    rr = torch.tensor([0.5], requires_grad=True)
    pairwise_loss(rc, rr).loss.backward()
    assert rc.grad.item() == pytest.approx(-0.5) and rr.grad.item() == pytest.approx(0.5)


def test_build_optimizer_uses_fused_adamw_with_the_same_updates():
    from lit_rlhf.optim import build_optimizer

    torch.manual_seed(0)
    a = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(3))]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    cfg = OptimConfig(lr=1e-2, weight_decay=0.1)
    fused = build_optimizer(a, cfg, total_steps=10)["optimizer"]
    plain = torch.optim.AdamW(b, lr=1e-2, betas=cfg.betas, eps=cfg.eps, weight_decay=0.1, fused=False, foreach=False)
    assert fused.defaults["fused"] is True
    for _ in range(3):
        for pa, pb in zip(a, b):
            pa.grad = pb.grad = None
            g = torch.randn_like(pa)
            pa.grad, pb.grad = g.clone(), g.clone()
        fused.step()
        plain.step()
    for pa, pb in zip(a, b):
        torch.testing.assert_close(pa, pb)
