"""Losses as pure functions: tensors in, a scalar loss and a few statistics out."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


class LMLossStats(NamedTuple):
    loss: torch.Tensor
    """Mean next-token cross-entropy over counted tokens, scalar."""
    n_tokens: torch.Tensor
    """Number of counted (label != -100) target tokens, scalar long."""
    n_correct: torch.Tensor | None
    """How many counted tokens the argmax predicts exactly, scalar long (None unless asked)."""


def causal_lm_loss(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX, count_correct: bool = False
) -> LMLossStats:
    """Next-token cross-entropy: position t predicts ``labels[t + 1]``.

    Args:
        logits: (B, T, V) model outputs.
        labels: (B, T) token ids, ``ignore_index`` where no loss is wanted (prompt tokens,
            the first token of a packed document).
        count_correct: also count argmax hits (an extra pass over the logits: validation only).

    Returns:
        :class:`LMLossStats`; ``loss`` is NaN-free 0 when no token counts (a chunk made only
        of prompt tokens) so that it adds nothing to the gradient.
    """
    # Shift the labels, not the logits: slicing (B, T, V) logits copies them, and its
    # backward writes a zero-filled full-size gradient. The last position gets no target.
    targets = F.pad(labels[:, 1:], (0, 1), value=ignore_index)
    mask = targets != ignore_index
    n_tokens = mask.sum()
    # Cross-entropy in float32: bf16 log-softmax over a large vocabulary loses precision.
    loss_sum = F.cross_entropy(
        logits.float().reshape(-1, logits.size(-1)),
        targets.reshape(-1),
        ignore_index=ignore_index,
        reduction="sum",
    )
    loss = loss_sum / n_tokens.clamp(min=1)
    n_correct = None
    if count_correct:
        with torch.no_grad():
            n_correct = ((logits.argmax(-1) == targets) & mask).sum()
    return LMLossStats(loss, n_tokens, n_correct)


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
