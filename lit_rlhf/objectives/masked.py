"""Masked statistics: sums, means, variances and whitening over the real tokens of a batch.

Everything here is a pure function of its tensor arguments. A ``mask`` is float or bool, the
same shape as the tensor it masks, nonzero on real tokens. The functions read nothing at
masked-out positions (padding may hold garbage, even NaN) and, where they return a per-token
tensor, write 0 there.

Statistics are accumulated in at least float32 and never trigger a host-device sync: an empty
mask gives a mean and variance of 0 rather than NaN or an exception, so that a micro-batch
with no response tokens cannot stall or crash a step. ``group_sum`` makes a statistic global
across DDP ranks with one collective.
"""

from __future__ import annotations

from typing import Callable, Literal

import torch

GroupSum = Callable[[torch.Tensor], torch.Tensor]
"""Reduces a tensor of partial sums across processes, e.g. ``lambda t: all_reduce(t)`` with a
SUM op. It receives and must return a tensor of the same shape; ``None`` means one process."""


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype for ``dtype``: at least float32."""
    # bf16/fp16 sums over thousands of tokens lose whole digits; float64 stays float64.
    return torch.promote_types(dtype, torch.float32)


def bool_mask(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``mask`` as bool, after checking it has the shape of ``x``."""
    if mask.shape != x.shape:
        raise ValueError(
            f"mask shape {tuple(mask.shape)} does not match tensor shape {tuple(x.shape)}"
        )
    return mask if mask.dtype == torch.bool else mask != 0


def _sum_count(
    x: torch.Tensor, mask: torch.Tensor, dim, group_sum: GroupSum | None
) -> tuple[torch.Tensor, torch.Tensor]:
    m = bool_mask(x, mask)
    acc = acc_dtype(x.dtype)
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
    m = bool_mask(x, mask)
    xs = torch.where(m, x.to(acc_dtype(x.dtype)), 0)
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
    centered = torch.where(bool_mask(x, mask), x.to(mean.dtype) - mean, 0)
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
    return torch.where(bool_mask(x, mask), whitened, 0)


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


Aggregation = Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum"]


def aggregate(values: torch.Tensor, mask: torch.Tensor, mode: Aggregation = "token_mean") -> torch.Tensor:
    """Reduce a per-token loss (B, T) to a scalar over the masked-in tokens.

    * ``token_mean``: every token of the batch weighs the same (DAPO);
    * ``seq_mean_token_mean``: the mean over each sequence's tokens, then over sequences
      (GRPO): a token of a short response weighs more;
    * ``seq_mean_token_sum``: the sum over each sequence's tokens, then the mean over sequences
      (Dr. GRPO, without its constant divisor): no length normalisation at all.

    A sequence with no masked-in token adds 0 to the sequence means (it still counts in B).
    """
    m = bool_mask(values, mask)
    x = torch.where(m, values, 0)
    if mode == "token_mean":
        return masked_mean(x, m)
    per_sequence = x.sum(-1)
    if mode == "seq_mean_token_mean":
        per_sequence = per_sequence / m.sum(-1).clamp(min=1)
    elif mode != "seq_mean_token_sum":
        raise ValueError(f"loss aggregation must be token_mean, seq_mean_token_mean or seq_mean_token_sum, got {mode!r}")
    return per_sequence.mean()
