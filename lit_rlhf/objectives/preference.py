"""Preference losses: the pairwise (Bradley-Terry) reward-model loss."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


class PairStats(NamedTuple):
    loss: torch.Tensor
    """Scalar pairwise loss (plus centering, if any)."""
    accuracy: torch.Tensor
    """Fraction of pairs with r_chosen > r_rejected strictly; ties count as wrong."""
    margin: torch.Tensor
    """Mean of r_chosen - r_rejected."""


def pairwise_loss(
    r_chosen: torch.Tensor,
    r_rejected: torch.Tensor,
    margin: torch.Tensor | None = None,
    center_coef: float = 0.0,
) -> PairStats:
    """Bradley-Terry reward-model loss ``-logsigmoid(r_c - r_r - margin)``.

    Args:
        r_chosen: (B,) scores of the preferred responses.
        r_rejected: (B,) scores of the other responses.
        margin: optional (B,) required gap (e.g. from a rating-difference column).
        center_coef: weight ``c`` of reward centering ``c * mean((r_c + r_r)^2)``, which
            keeps scores near zero mean so they are comparable across checkpoints.
    """
    diff = r_chosen.float() - r_rejected.float()
    target = diff if margin is None else diff - margin.float()
    loss = -F.logsigmoid(target).mean()
    if center_coef:
        loss = loss + center_coef * ((r_chosen.float() + r_rejected.float()) ** 2).mean()
    with torch.no_grad():
        accuracy = (diff > 0).float().mean()
    return PairStats(loss, accuracy, diff.detach().mean())
