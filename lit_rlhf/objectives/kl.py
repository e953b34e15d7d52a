"""KL(policy || reference): per-token estimators and the controllers of the penalty coefficient.

Estimators follow Schulman's "Approximating KL divergence" notes; the controllers follow
Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences", section 2.2.
A controller owns the coefficient ``value`` that scales the per-token KL penalty in
:func:`lit_rlhf.objectives.shaping.compute_rewards`. Both expose ``state_dict`` /
``load_state_dict`` so the Lightning module can checkpoint them. Only ``value`` is state: the
hyperparameters come from the configuration, so a resumed run uses the configured target and
horizon.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch

from lit_rlhf.objectives.masked import acc_dtype

KLKind = Literal["k1", "abs", "mse", "k3"]


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
    acc = acc_dtype(torch.promote_types(logp.dtype, ref_logp.dtype))
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


# ------------------------------------------------------------------------------ controllers


def _check_coef(name: str, value: float) -> float:
    value = float(value)
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    return value


class KLController:
    """Base: holds ``value`` and (de)serialises it; subclasses implement :meth:`update`."""

    value: float

    def update(self, current_kl: float, n_steps: int) -> None:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "value" not in state_dict:
            raise KeyError(f"{type(self).__name__} state_dict needs a 'value' entry")
        self.value = _check_coef("state_dict['value']", state_dict["value"])

    def __repr__(self) -> str:
        return f"{type(self).__name__}(value={self.value})"


class FixedKLController(KLController):
    """A constant coefficient; :meth:`update` does nothing."""

    def __init__(self, value: float) -> None:
        self.value = _check_coef("value", value)

    def update(self, current_kl: float, n_steps: int) -> None:
        pass


class AdaptiveKLController(KLController):
    """Proportional controller steering the measured KL towards ``target``.

    ``e = clip(current_kl / target - 1, -0.2, 0.2)``; ``value *= 1 + e * n_steps / horizon``.
    The clip bounds how fast the coefficient can move on one noisy KL measurement; with
    ``n_steps`` the number of samples (episodes) that produced it, ``horizon`` is roughly the
    number of samples over which the coefficient can change by a factor of ``e^0.2``.

    Args:
        init_kl_coef: starting coefficient, >= 0 (0 stays 0: the update is multiplicative).
        target: desired KL per sequence, > 0.
        horizon: > 0.
    """

    def __init__(
        self, init_kl_coef: float = 0.2, target: float = 6.0, horizon: float = 10000
    ) -> None:
        self.value = _check_coef("init_kl_coef", init_kl_coef)
        if not (math.isfinite(target) and target > 0):
            raise ValueError(f"target must be a finite number > 0, got {target}")
        if not (math.isfinite(horizon) and horizon > 0):
            raise ValueError(f"horizon must be a finite number > 0, got {horizon}")
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        current_kl = float(current_kl)  # also accepts a 0-d tensor
        # A NaN would otherwise poison the coefficient for the rest of the run.
        if not math.isfinite(current_kl):
            raise ValueError(f"current_kl must be finite, got {current_kl}")
        if n_steps < 0:
            raise ValueError(f"n_steps must be >= 0, got {n_steps}")
        proportional_error = min(max(current_kl / self.target - 1, -0.2), 0.2)
        self.value *= 1 + proportional_error * n_steps / self.horizon

    def __repr__(self) -> str:
        return (
            f"AdaptiveKLController(value={self.value}, target={self.target}, "
            f"horizon={self.horizon})"
        )
