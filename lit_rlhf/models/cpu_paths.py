"""CPU-only speed paths, and the one place that decides whether they run.

Two code paths exist only because they measured faster on a CPU (the benchmarks' 2-core AMD
EPYC); neither is needed for correctness, and both are off on every other device:

* ``rm_last_block_rows``: the reward model's packed pass runs its last block's MLP at the scored
  tokens only (:func:`~lit_rlhf.models.heads.last_block_rows`).
* ``onednn_decode_linears``: sampling's plain ``nn.Linear`` layers run through oneDNN with
  packed weights (:func:`~lit_rlhf.models.linears.onednn_linears`).

Switch them off, e.g. for an A/B measurement (``benchmarks/cpu_paths.py``), with the environment
variable ``LIT_RLHF_CPU_PATHS``: unset, ``1`` or ``all``: both on (the default); ``0`` or
``none``: both off; otherwise a comma-separated list of the paths that stay on (e.g.
``LIT_RLHF_CPU_PATHS=rm_last_block_rows``). It is read at every use, so setting it in a running
process takes effect at the next reward pass or ``generate`` call. A name that is not a path is
an error, not a silent "off".
"""

from __future__ import annotations

import os

import torch

CPU_PATHS = ("rm_last_block_rows", "onednn_decode_linears")
"""The names of the CPU-only paths."""

ENV_VAR = "LIT_RLHF_CPU_PATHS"


def switched_on(env: str | None = None) -> frozenset[str]:
    """The paths that ``LIT_RLHF_CPU_PATHS`` (or ``env``, if given) leaves on (see the module docstring)."""
    value = os.environ.get(ENV_VAR) if env is None else env
    if value is None or value.strip().lower() in ("1", "all", "true", "on"):
        return frozenset(CPU_PATHS)
    if value.strip().lower() in ("0", "none", "false", "off", ""):
        return frozenset()
    names = {name.strip() for name in value.split(",") if name.strip()}
    unknown = sorted(names - set(CPU_PATHS))
    if unknown:
        raise ValueError(f"{ENV_VAR}={value!r}: unknown path(s) {', '.join(unknown)}; "
                         f"use 1, 0 or a comma-separated list of {', '.join(CPU_PATHS)}")
    return frozenset(names)


def cpu_path_enabled(name: str, device: torch.device | str | None, env: str | None = None) -> bool:
    """Whether the CPU path ``name`` runs for tensors on ``device``: only on the CPU (never on
    CUDA, XPU, MPS or meta tensors, nor when the device is unknown), and only if switched on.

    Args:
        name: one of :data:`CPU_PATHS`.
        device: where the path's tensors live (its model's or its inputs' device).
        env: the switch's value instead of the environment's (for tests).
    """
    if name not in CPU_PATHS:
        raise ValueError(f"unknown CPU path {name!r}; the paths are {', '.join(CPU_PATHS)}")
    on = switched_on(env)  # read first: a bad value is an error on every device
    return device is not None and torch.device(device).type == "cpu" and name in on
