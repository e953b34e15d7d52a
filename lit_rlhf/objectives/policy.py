"""Policy-gradient losses: PPO's clipped surrogate objectives (Schulman et al. 2017).

Each returns a scalar loss to minimise and a NamedTuple of detached statistics. Shapes: ``B``
sequences by ``T`` response positions; ``mask`` is float or bool, nonzero on real tokens.
Masked-out positions may hold anything (even NaN): they are replaced before any arithmetic,
so they reach neither the loss nor its gradient.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from lit_rlhf.objectives.masked import Aggregation, aggregate, bool_mask, masked_mean


class PolicyStats(NamedTuple):
    clipfrac: torch.Tensor
    """Fraction of tokens where the clipped term is the active (strictly larger) one."""
    approx_kl: torch.Tensor
    """``masked_mean(0.5 * (logp - old_logp)**2)``: the k2 estimator of KL(old || new),
    biased but low-variance and non-negative; a warning light for too-large policy steps."""
    ratio_mean: torch.Tensor
    """Masked mean of ``exp(logp - old_logp)``."""
    ratio_max: torch.Tensor
    """Masked max of the ratio (0 when nothing is masked in)."""


class ValueStats(NamedTuple):
    clipfrac: torch.Tensor
    """Fraction of tokens where the clipped squared error is strictly larger."""
    value_mean: torch.Tensor
    """Masked mean of the predicted values."""
    value_mse: torch.Tensor
    """Masked mean of the unclipped squared error ``(values - returns)**2``."""


def _check(name: str, clip: float) -> None:
    if not clip >= 0:  # also rejects NaN
        raise ValueError(f"{name} must be >= 0, got {clip}")


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float,
    clip_range_high: float | None = None,
    aggregation: Aggregation = "token_mean",
) -> tuple[torch.Tensor, PolicyStats]:
    """Clipped surrogate policy loss.

    ``ratio = exp(logp - old_logp)``; per token ``max(-A * ratio, -A * clip(ratio, 1 - eps,
    1 + eps_high))``, the pessimistic bound, reduced over masked tokens by ``aggregation``.

    Args:
        logp: (B, T) log-probs of the sampled tokens under the current policy (with grad).
        old_logp: (B, T) the same at rollout time.
        advantages: (B, T), typically whitened (or one value per sequence, broadcast).
        mask: (B, T).
        clip_range: ``eps``, >= 0.
        clip_range_high: ``eps_high`` of the upper bound (DAPO's clip-higher, e.g. 0.28);
            None: ``eps``.
        aggregation: see :func:`~lit_rlhf.objectives.masked.aggregate`; PPO's is ``token_mean``.

    Returns:
        ``(loss, PolicyStats)``; the loss is a scalar, the stats are detached scalars.
    """
    _check("clip_range", clip_range)
    high = clip_range if clip_range_high is None else clip_range_high
    _check("clip_range_high", high)
    m = bool_mask(logp, mask)
    # Zero the log-ratio and advantages off-mask *before* exp and multiply: torch.where
    # blocks garbage in the forward pass, but exp(huge) = inf would still turn its zero
    # gradient into NaN (0 * inf) in the backward pass.
    log_ratio = torch.where(m, logp - old_logp, 0)
    adv = torch.where(m, advantages, 0)
    ratio = torch.exp(log_ratio)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_range, 1.0 + high)
    loss = aggregate(torch.maximum(unclipped, clipped), m, aggregation)
    with torch.no_grad():
        stats = PolicyStats(
            clipfrac=masked_mean((clipped > unclipped).to(ratio.dtype), m),
            approx_kl=masked_mean(0.5 * log_ratio.square(), m),
            ratio_mean=masked_mean(ratio, m),
            ratio_max=torch.where(m, ratio, 0).amax(),
        )
    return loss, stats


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range_value: float,
) -> tuple[torch.Tensor, ValueStats]:
    """Clipped value loss: ``0.5 * masked_mean(max((v - R)**2, (v_clip - R)**2))`` with
    ``v_clip = clip(v, old_v - eps, old_v + eps)``.

    Taking the max means the value head gains nothing from moving more than ``eps`` away
    from its rollout-time prediction. Pass ``math.inf`` to disable clipping.

    Args:
        values: (B, T) current predictions (with grad).
        old_values: (B, T) predictions at rollout time.
        returns: (B, T) targets (from :func:`lit_rlhf.objectives.advantages.gae`).
        mask: (B, T).
        clip_range_value: ``eps``, >= 0.

    Returns:
        ``(loss, ValueStats)``; the loss is a scalar, the stats are detached scalars.
    """
    _check("clip_range_value", clip_range_value)
    m = bool_mask(values, mask)
    old = torch.where(m, old_values, 0)
    ret = torch.where(m, returns, 0)
    v = torch.where(m, values, 0)
    v_clipped = old + torch.clamp(v - old, -clip_range_value, clip_range_value)
    err_unclipped = (v - ret).square()
    err_clipped = (v_clipped - ret).square()
    loss = 0.5 * masked_mean(torch.maximum(err_unclipped, err_clipped), m)
    with torch.no_grad():
        stats = ValueStats(
            clipfrac=masked_mean((err_clipped > err_unclipped).to(err_clipped.dtype), m),
            value_mean=masked_mean(v, m),
            value_mse=masked_mean(err_unclipped, m),
        )
    return loss, stats
