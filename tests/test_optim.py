"""The optimizer and the LR schedule: hand-computed schedule values, config errors, fused AdamW."""

from __future__ import annotations

import pytest
import torch

from lit_rlhf.optim import OptimConfig, warmup_cosine


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
