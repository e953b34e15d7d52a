"""Optimizer and learning-rate schedule shared by every stage."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch


@dataclass
class OptimConfig:
    """AdamW with linear warmup then cosine decay."""

    lr: float = 2e-4
    """Peak learning rate."""
    weight_decay: float = 0.0
    """Decoupled weight decay."""
    betas: tuple[float, float] = (0.9, 0.95)
    """Adam betas."""
    eps: float = 1e-8
    """Adam epsilon."""
    warmup_steps: int = 0
    """Optimizer steps of linear warmup from 0."""
    min_lr_ratio: float = 0.1
    """The cosine decays to ``lr * min_lr_ratio`` at the last step."""
    optimizer: Literal["adamw", "adamw8bit"] = "adamw"
    """``adamw8bit``: bitsandbytes 8-bit AdamW states (2 bytes/param less per state)."""

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"optim.lr must be > 0, got {self.lr}")
        if self.warmup_steps < 0:
            raise ValueError(f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """LR multiplier at optimizer step ``step`` (0-based): linear warmup, then cosine."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


_FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _fused_supported(params: list[torch.Tensor]) -> bool:
    """Whether torch's fused AdamW handles all of ``params`` (floating, on CPU or CUDA)."""
    return all(p.device.type in ("cpu", "cuda") and p.dtype in _FUSED_DTYPES for p in params)


def build_optimizer(params, cfg: OptimConfig, total_steps: int, allow_fused: bool = True) -> dict:
    """Lightning's ``configure_optimizers`` return value for the trainable ``params``.

    ``allow_fused=False`` keeps torch's per-tensor AdamW: Lightning refuses to clip the
    gradients of a fused optimizer under mixed precision.
    """
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameters: check model.init_args.lm.lora / quantization settings")
    kwargs = dict(lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw8bit":
        import bitsandbytes as bnb

        optimizer = bnb.optim.AdamW8bit(params, **kwargs)
    else:
        # The fused kernel updates every tensor in one pass: on a 2-core CPU it measured 4x
        # faster than torch's default per-tensor loop for an 8M-parameter model.
        optimizer = torch.optim.AdamW(params, **kwargs, fused=allow_fused and _fused_supported(params))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, cfg.warmup_steps, total_steps, cfg.min_lr_ratio)
    )
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
