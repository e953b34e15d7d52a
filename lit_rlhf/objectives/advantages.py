"""Advantage estimators: turn rewards into the per-token weights of the policy gradient.

* GAE (Schulman et al. 2016), which needs a value function (PPO);
* critic-free estimators on groups of responses to the same prompt (one advantage per
  response, the same for all its tokens): GRPO's group-normalised reward (Shao et al. 2024;
  Dr. GRPO without the std), RLOO's leave-one-out baseline (Ahmadian et al. 2024) and
  REINFORCE++'s group-mean baseline whitened over the batch (Hu 2025).

Group layout everywhere: ``rewards`` is (B,) with ``B = n_prompts * group_size`` and the
``group_size`` responses of one prompt next to each other (``rewards.view(-1, group_size)``).
"""

from __future__ import annotations

from typing import Literal

import torch

from lit_rlhf.objectives.masked import acc_dtype, bool_mask


@torch.no_grad()  # advantages and returns are regression targets, never differentiated
def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016).

    ``delta_t = r_t + gamma * V_{t+1} - V_t`` and ``A_t = delta_t + gamma * lam * A_{t+1}``,
    with ``V = 0`` and ``A = 0`` past each row's last real token (the episode ends there).

    Args:
        rewards: (B, T) per-token rewards.
        values: (B, T) value estimates of the rollout.
        mask: (B, T) nonzero on real tokens, a run from index 0 followed by padding.
        gamma: discount.
        lam: GAE lambda.

    Returns:
        ``(advantages, returns)``, both (B, T), ``returns = advantages + values``, 0 at
        masked-out positions. Not whitened.
    """
    m = bool_mask(values, mask)
    if rewards.shape != values.shape:
        raise ValueError(f"rewards {tuple(rewards.shape)} and values {tuple(values.shape)} differ")
    acc = acc_dtype(torch.promote_types(rewards.dtype, values.dtype))
    r = torch.where(m, rewards.to(acc), 0)
    v = torch.where(m, values.to(acc), 0)
    # Padding has r = V = 0, so it contributes delta = 0 and the recursion restarts at 0 at
    # every row's own end; only the time loop remains in Python.
    next_v = torch.cat([v[:, 1:], torch.zeros_like(v[:, :1])], dim=1)
    deltas = r + gamma * next_v - v
    advantages = torch.empty_like(deltas)
    running = torch.zeros_like(deltas[:, 0])
    for t in range(deltas.shape[1] - 1, -1, -1):
        running = deltas[:, t] + gamma * lam * running
        advantages[:, t] = running
    advantages = torch.where(m, advantages, 0)
    return advantages, advantages + v


def _groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    if group_size < 2 or rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards of shape {tuple(rewards.shape)} do not split into groups of {group_size} (>= 2)")
    return rewards.float().view(-1, group_size)


@torch.no_grad()
def group_advantages(
    rewards: torch.Tensor, group_size: int, scale: Literal["group", "batch", "none"] = "group", eps: float = 1e-4
) -> torch.Tensor:
    """GRPO: ``(r - mean(group)) / (std + eps)``, (B,) -> (B,).

    ``scale``: ``group`` divides by the group's std (GRPO), ``batch`` by the std of the whole
    batch's rewards, ``none`` not at all (Dr. GRPO). Stds are unbiased (``torch.std``).
    """
    g = _groups(rewards, group_size)
    centred = g - g.mean(dim=1, keepdim=True)
    if scale == "group":
        centred = centred / (g.std(dim=1, keepdim=True) + eps)
    elif scale == "batch":
        centred = centred / (g.std() + eps)
    elif scale != "none":
        raise ValueError(f"scale must be group, batch or none, got {scale!r}")
    return centred.flatten()


@torch.no_grad()
def rloo_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """RLOO: each reward minus the mean of the *other* ``group_size - 1`` rewards of its group,
    (B,) -> (B,); equals ``G / (G - 1) * (r - mean(group))``."""
    g = _groups(rewards, group_size)
    others = (g.sum(dim=1, keepdim=True) - g) / (group_size - 1)
    return (g - others).flatten()


@torch.no_grad()
def reinforce_baseline_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-8) -> torch.Tensor:
    """REINFORCE++ with baseline: ``r - mean(group)``, then whitened over the whole batch, (B,) -> (B,)."""
    centred = (_groups(rewards, group_size) - _groups(rewards, group_size).mean(dim=1, keepdim=True)).flatten()
    return (centred - centred.mean()) / (centred.std() + eps)


@torch.no_grad()
def informative_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """(B,) rewards -> (B / group_size,) bool: True where a group's rewards are not all equal."""
    g = _groups(rewards, group_size)
    return (g != g[:, :1]).any(dim=1)


@torch.no_grad()
def zero_std_groups(rewards: torch.Tensor, group_size: int) -> int:
    """Groups whose rewards are all equal: they carry no signal to any group estimator."""
    return int((~informative_groups(rewards, group_size)).sum())
