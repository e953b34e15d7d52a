"""Reward shaping for PPO-style RL: a per-token KL penalty plus the score on the last token."""

from __future__ import annotations

from typing import NamedTuple

import torch

from lit_rlhf.objectives.kl import KLKind, kl_penalty
from lit_rlhf.objectives.masked import bool_mask


class RewardsOut(NamedTuple):
    rewards: torch.Tensor
    """(B, T) per-token reward: ``non_score_reward`` plus the score on each row's last token."""
    kl: torch.Tensor
    """(B, T) the per-token KL estimate, 0 at masked-out positions."""
    non_score_reward: torch.Tensor
    """(B, T) ``-kl_coef * kl``."""


@torch.no_grad()  # rewards are constants to PPO; a graph through them would be a bug
def compute_rewards(
    scores: torch.Tensor,
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
    kl_kind: KLKind = "k1",
) -> RewardsOut:
    """Per-token rewards of Ziegler et al. (2019): a KL penalty on every response token and the
    sequence-level score on the last one.

    Args:
        scores: (B,) reward-model score per sequence.
        logp: (B, T) log-probs of the response tokens under the rollout policy.
        ref_logp: (B, T) the same under the frozen reference model.
        mask: (B, T) nonzero on response tokens (a run from index 0, then padding).
        kl_coef: penalty coefficient (e.g. ``controller.value``).
        kl_kind: estimator, see :func:`kl_penalty`.

    Returns:
        :class:`RewardsOut`, all 0 at masked-out positions. A row with no response token gets
        no reward at all (its score has nowhere to go).
    """
    m = bool_mask(logp, mask)
    if scores.shape != logp.shape[:1]:
        raise ValueError(f"scores shape {tuple(scores.shape)} should be ({logp.shape[0]},)")
    kl = torch.where(m, kl_penalty(logp, ref_logp, kl_kind), 0)
    non_score_reward = -kl_coef * kl
    positions = torch.arange(m.shape[1], device=m.device)
    # Last masked index per row (-1 when the row is empty, which matches no position).
    last = torch.where(m, positions, -1).amax(dim=1)
    is_last = positions == last.unsqueeze(1)
    rewards = non_score_reward + is_last * scores.to(kl.dtype).unsqueeze(1)
    return RewardsOut(rewards, kl, non_score_reward)
