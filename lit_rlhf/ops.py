"""Tensor ops for PPO-style RLHF: log-probs, masked statistics, KL estimators, rewards, GAE.

Everything here is a pure function of its tensor arguments. Shapes use ``B`` for the batch,
``T`` for response positions and ``V`` for the vocabulary. A ``mask`` is float or bool, the
same shape as the tensor it masks, nonzero on real response tokens. The functions read
nothing at masked-out positions (padding may hold garbage, even NaN) and, where they return a
per-token tensor, write 0 there.

Statistics are accumulated in at least float32 and never trigger a host-device sync: an empty
mask gives a mean and variance of 0 rather than NaN or an exception, so that a micro-batch
with no response tokens cannot stall or crash a step.
"""

from __future__ import annotations

from typing import Callable, Literal, NamedTuple

import torch

GroupSum = Callable[[torch.Tensor], torch.Tensor]
"""Reduces a tensor of partial sums across processes, e.g. ``lambda t: all_reduce(t)`` with a
SUM op. It receives and must return a tensor of the same shape; ``None`` means one process."""

KLKind = Literal["k1", "abs", "mse", "k3"]


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    # bf16/fp16 sums over thousands of tokens lose whole digits; float64 stays float64.
    return torch.promote_types(dtype, torch.float32)


def _bool_mask(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    if mask.shape != x.shape:
        raise ValueError(
            f"mask shape {tuple(mask.shape)} does not match tensor shape {tuple(x.shape)}"
        )
    return mask if mask.dtype == torch.bool else mask != 0


# ----------------------------------------------------------------------------------- log-probs


EntropyMode = Literal["grad", "detached", "skip"]


def logprobs_and_entropy(
    logits: torch.Tensor, labels: torch.Tensor, entropy: EntropyMode = "grad"
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probability of ``labels`` and the entropy of ``softmax(logits)``, per position.

    Args:
        logits: (B, T, V), any floating dtype.
        labels: (B, T) valid token ids (pad with the pad token id, not -100, and mask later).
        entropy: ``grad`` (differentiable, for an entropy bonus), ``detached`` (a statistic:
            no autograd graph over (T, V)) or ``skip`` (returns None).

    Returns:
        logprobs (B, T) and entropy (B, T) or None, in float32 (float64 for float64 logits);
        the log-probs are differentiable w.r.t. ``logits``.
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree")
    acc = _acc_dtype(logits.dtype)
    if logits.shape[0] == 0:
        empty = logits.new_zeros(labels.shape, dtype=acc)
        return empty, None if entropy == "skip" else empty
    # gather - logsumexp never materialises the (T, V) log-softmax, and going row by row keeps
    # the float32 upcast of bf16 logits (the big allocation) to one (T, V) slice at a time.
    logps, entropies = [], []
    for row_logits, row_labels in zip(logits, labels):
        row = row_logits.to(acc)
        lse = torch.logsumexp(row, dim=-1)  # (T,), shared by both outputs
        logps.append(row.gather(-1, row_labels.unsqueeze(-1)).squeeze(-1) - lse)
        if entropy != "skip":
            with torch.set_grad_enabled(entropy == "grad" and torch.is_grad_enabled()):
                # H = lse - sum_v p_v l_v, which avoids log(p) = -inf for p underflowing to 0.
                entropies.append(lse - (torch.exp(row - lse.unsqueeze(-1)) * row).sum(-1))
    return torch.stack(logps), torch.stack(entropies) if entropies else None


def logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B, T, V) logits, (B, T) labels -> (B, T) log-probs (see :func:`logprobs_and_entropy`)."""
    return logprobs_and_entropy(logits, labels, entropy="skip")[0]


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of ``softmax(logits)`` per position: (B, T, V) -> (B, T), float32 or float64."""
    labels = torch.zeros(logits.shape[:-1], dtype=torch.long, device=logits.device)
    return logprobs_and_entropy(logits, labels)[1]


# --------------------------------------------------------------------------- masked statistics


def _sum_count(
    x: torch.Tensor, mask: torch.Tensor, dim, group_sum: GroupSum | None
) -> tuple[torch.Tensor, torch.Tensor]:
    m = _bool_mask(x, mask)
    acc = _acc_dtype(x.dtype)
    # where, not x * mask: NaN/inf in padding would survive a multiplication by 0.
    xs = torch.where(m, x.to(acc), 0)
    if dim is None:
        s, n = xs.sum(), m.sum().to(acc)
    else:
        s, n = xs.sum(dim), m.sum(dim).to(acc)
    if group_sum is not None:
        # One collective for both; float32 counts are exact up to 2**24 tokens.
        s, n = group_sum(torch.stack([s, n])).unbind(0)
    return s, n


def masked_sum(
    x: torch.Tensor, mask: torch.Tensor, dim=None, group_sum: GroupSum | None = None
) -> torch.Tensor:
    """Sum of ``x`` over nonzero ``mask`` entries, over ``dim`` (all dims when None).

    ``group_sum`` is applied to the reduced sum, so with an all-reduce it is the sum over all
    ranks (for ``dim`` given, ranks must agree on the shape of the result).
    """
    m = _bool_mask(x, mask)
    xs = torch.where(m, x.to(_acc_dtype(x.dtype)), 0)
    s = xs.sum() if dim is None else xs.sum(dim)
    return s if group_sum is None else group_sum(s)


def masked_mean(
    x: torch.Tensor, mask: torch.Tensor, dim=None, group_sum: GroupSum | None = None
) -> torch.Tensor:
    """Mean of ``x`` over nonzero ``mask`` entries, over ``dim`` (all dims when None).

    With ``group_sum`` the sum and the count are reduced (in one call) before dividing, which
    makes the result the mean over every rank's tokens, identical on all ranks. Slices with no
    masked entry give 0.
    """
    s, n = _sum_count(x, mask, dim, group_sum)
    return s / n.clamp(min=1)


def _masked_mean_var(
    x: torch.Tensor, mask: torch.Tensor, unbiased: bool, group_sum: GroupSum | None
) -> tuple[torch.Tensor, torch.Tensor]:
    s, n = _sum_count(x, mask, None, group_sum)
    mean = s / n.clamp(min=1)
    # Two passes (sum of squared deviations from the global mean) instead of E[x^2] - E[x]^2,
    # which cancels catastrophically when |mean| >> std; it costs one more collective.
    centered = torch.where(_bool_mask(x, mask), x.to(mean.dtype) - mean, 0)
    ss = centered.square().sum()
    if group_sum is not None:
        ss = group_sum(ss)
    denom = (n - 1) if unbiased else n
    return mean, ss / denom.clamp(min=1)


def masked_var(
    x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True, group_sum: GroupSum | None = None
) -> torch.Tensor:
    """Variance of ``x`` over all nonzero ``mask`` entries, a scalar.

    ``unbiased`` applies Bessel's correction ``n / (n - 1)``; fewer than two entries give 0.
    ``group_sum`` makes it the variance over all ranks (see :func:`masked_mean`).
    """
    return _masked_mean_var(x, mask, unbiased, group_sum)[1]


def masked_whiten(
    x: torch.Tensor,
    mask: torch.Tensor,
    shift_mean: bool = True,
    eps: float = 1e-8,
    group_sum: GroupSum | None = None,
) -> torch.Tensor:
    """Normalise ``x`` to zero mean and unit variance using only masked entries.

    Args:
        x: (B, T).
        mask: (B, T).
        shift_mean: when False the mean is added back, so only the scale changes (used for
            rewards, whose sign carries meaning).
        eps: added to the (unbiased) variance.
        group_sum: makes mean and variance global across ranks (see :func:`masked_mean`).

    Returns:
        (B, T), 0 at masked-out positions.
    """
    mean, var = _masked_mean_var(x, mask, True, group_sum)
    whitened = (x.to(mean.dtype) - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(_bool_mask(x, mask), whitened, 0)


def explained_variance(
    values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    group_sum: GroupSum | None = None,
) -> torch.Tensor:
    """``1 - Var(returns - values) / Var(returns)`` over masked entries, a scalar.

    1 is a perfect value function, 0 one no better than a constant, negative worse than that.
    NaN when the returns have zero variance (the ratio is undefined, and a diagnostic should
    say so rather than report a made-up number).
    """
    var_returns = masked_var(returns, mask, unbiased=False, group_sum=group_sum)
    var_residual = masked_var(returns - values, mask, unbiased=False, group_sum=group_sum)
    ev = 1 - var_residual / var_returns
    return torch.where(var_returns > 0, ev, torch.full_like(ev, float("nan")))


# ------------------------------------------------------------------------------ KL and rewards


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, kind: KLKind = "k1") -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from log-probs of sampled tokens.

    With ``d = logp - ref_logp`` (tokens sampled from the policy), following Schulman's
    "Approximating KL divergence" notes:

    - ``"k1"``: ``d``, unbiased but negative on many tokens.
    - ``"abs"``: ``|d|``.
    - ``"mse"``: ``0.5 * d**2`` (k2), biased, low variance, non-negative.
    - ``"k3"``: ``exp(-d) - 1 + d``, unbiased and non-negative.

    Args:
        logp, ref_logp: (B, T).

    Returns:
        (B, T) in at least float32; masking is left to the caller.
    """
    acc = _acc_dtype(torch.promote_types(logp.dtype, ref_logp.dtype))
    d = logp.to(acc) - ref_logp.to(acc)
    if kind == "k1":
        return d
    if kind == "abs":
        return d.abs()
    if kind == "mse":
        return 0.5 * d.square()
    if kind == "k3":
        # expm1 keeps precision for small d, where exp(-d) - 1 would cancel; the clamp removes
        # the last-ulp negatives rounding can still leave (the true value is >= 0).
        return (torch.expm1(-d) + d).clamp(min=0)
    raise ValueError(f"kind must be one of 'k1', 'abs', 'mse', 'k3', got {kind!r}")


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
    m = _bool_mask(logp, mask)
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


# ------------------------------------------------------------------------------------------ GAE


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
    m = _bool_mask(values, mask)
    if rewards.shape != values.shape:
        raise ValueError(f"rewards {tuple(rewards.shape)} and values {tuple(values.shape)} differ")
    acc = _acc_dtype(torch.promote_types(rewards.dtype, values.dtype))
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
