"""Preference losses: the pairwise (Bradley-Terry) reward-model loss, and the direct
preference losses of the DPO family on sequence log-probs."""

from __future__ import annotations

from typing import Literal, NamedTuple

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


DPOLossType = Literal["sigmoid", "ipo", "hinge"]


class DPOStats(NamedTuple):
    loss: torch.Tensor
    """Scalar loss (mean over pairs, plus the NLL term if any)."""
    reward_chosen: torch.Tensor
    """(B,) implicit rewards ``beta * (logp_c - ref_c)``, detached."""
    reward_rejected: torch.Tensor
    """(B,) ``beta * (logp_r - ref_r)``, detached."""
    accuracy: torch.Tensor
    """Fraction of pairs with reward_chosen > reward_rejected strictly; ties count as wrong."""


def dpo_loss(
    logp_chosen: torch.Tensor,
    logp_rejected: torch.Tensor,
    ref_chosen: torch.Tensor | None,
    ref_rejected: torch.Tensor | None,
    beta: float = 0.1,
    loss_type: DPOLossType = "sigmoid",
    label_smoothing: float = 0.0,
    nll_chosen: torch.Tensor | None = None,
    nll_coef: float = 0.0,
    target_margin: float = 0.0,
) -> DPOStats:
    """Direct preference losses on the log-ratio margin
    ``h = (logp_c - ref_c) - (logp_r - ref_r)`` of each pair.

    * ``sigmoid`` (DPO, Rafailov et al. 2023): ``-(1 - ls) * logsigmoid(z) - ls * logsigmoid(-z)``,
      ``z = beta * h - target_margin``, ``ls`` = ``label_smoothing`` (conservative DPO: the
      label is wrong with probability ls); SimPO (Meng et al. 2024) is this with mean token
      log-probs, no reference and ``target_margin`` = its gamma;
    * ``ipo`` (Azar et al. 2023): ``(h - 1 / (2 * beta)) ** 2``;
    * ``hinge`` (SLiC): ``relu(1 - beta * h)``.

    Args:
        logp_chosen, logp_rejected: (B,) policy log-probs of the responses (summed over
            response tokens, or averaged for a length-normalised, SimPO-style variant).
        ref_chosen, ref_rejected: (B,) the same under the reference; None for the
            reference-free variant (``h = logp_c - logp_r``).
        beta: > 0, the inverse temperature of the implicit reward.
        nll_chosen: (B,) mean per-token NLL of the chosen responses, weighted by
            ``nll_coef`` (RPO: DPO plus an SFT term on the chosen side).
        target_margin: >= 0, subtracted from ``beta * h`` in the sigmoid loss (SimPO's gamma).
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if target_margin < 0 or (target_margin and loss_type != "sigmoid"):
        raise ValueError(f"target_margin must be >= 0 and is for loss_type sigmoid, got {target_margin} with {loss_type}")
    chosen = logp_chosen.float() - (0.0 if ref_chosen is None else ref_chosen.float())
    rejected = logp_rejected.float() - (0.0 if ref_rejected is None else ref_rejected.float())
    h = chosen - rejected
    if loss_type == "sigmoid":
        z = beta * h - target_margin
        losses = -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * h)
    else:
        raise ValueError(f"unknown loss_type {loss_type!r} (sigmoid, ipo, hinge)")
    loss = losses.mean()
    if nll_coef:
        if nll_chosen is None:
            raise ValueError("nll_coef > 0 needs nll_chosen")
        loss = loss + nll_coef * nll_chosen.float().mean()
    with torch.no_grad():
        reward_chosen, reward_rejected = beta * chosen.detach(), beta * rejected.detach()
        accuracy = (reward_chosen > reward_rejected).float().mean()
    return DPOStats(loss, reward_chosen, reward_rejected, accuracy)
