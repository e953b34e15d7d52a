"""Advantage estimators: turn rewards into the per-token weights of the policy gradient.

Today: GAE (Schulman et al. 2016), which needs a value function.
"""

from __future__ import annotations

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
