"""Decoding's linear layers on CPU through oneDNN instead of MKL.

PyTorch runs a float32 ``nn.Linear`` on CPU as an MKL GEMM. A decode step feeds one token per
sequence, so every linear layer multiplies a few rows by a whole weight matrix, and there MKL
is slow on this project's CPU (AMD EPYC, 2 threads): the 29 linears of the benchmarks'
8.3M-parameter Llama, weights read cold as in a real step, took 5.6 ms at 8 rows and 7.9 ms at
32 through ``F.linear`` against 3.0 and 4.9 ms through oneDNN's linear
(``torch.ops.mkldnn._linear_pointwise``). :func:`~lit_rlhf.modules.rollout.generate` on the
``grpo_varlen`` benchmark's rollout (32 rows, up to 64 tokens) went from 0.72 to 0.56 s, on
PPO's (8 rows, 40 tokens) from 0.37 to 0.29 s (medians of 6 interleaved runs), the same tokens,
log-probs equal to 1e-6.

Only sampling uses it: its log-probs are a logged statistic, while the scoring and update
passes, whose log-probs must agree to the last bit (the step-0 ratio of 1), keep the one kernel
of ``F.linear``. Anything else (a CUDA tensor, autocast, bf16 weights, ``torch.compile``) falls
through to ``F.linear``, as do quantized layers (``nn.Linear`` subclasses with a forward of their
own) and a torch built without oneDNN; a LoRA layer's base and adapter linears are plain
``nn.Linear`` and take the oneDNN path.
"""

from __future__ import annotations

import contextlib
import functools
import types
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn


def onednn_available() -> bool:
    """Whether this torch has oneDNN's CPU linear kernel."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _onednn_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``nn.Linear.forward`` through oneDNN for float32 CPU inputs outside autocast and autograd
    (and outside ``torch.compile``, which lowers linears its own way)."""
    if (x.is_cpu and x.dtype == torch.float32 and self.weight.dtype == torch.float32
            and type(x) is torch.Tensor and type(self.weight.data) is torch.Tensor  # no DTensor, no subclass
            and x.size(-1) == self.in_features  # else F.linear's error, which names the shapes
            and not torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu")
            and not torch.compiler.is_compiling()):
        return _onednn_linear(x, self.weight, self.bias)
    return F.linear(x, self.weight, self.bias)


def _onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """(..., in) @ (out, in).T + (out,) -> (..., out), by oneDNN (no activation fused)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


@contextlib.contextmanager
def onednn_linears(model) -> Iterator[None]:
    """Within the block, the plain ``nn.Linear`` layers of ``model`` run on oneDNN where
    :func:`_onednn_forward` says so; their own ``forward`` is back afterwards, also after an
    error. Subclasses (bitsandbytes' quantized layers) keep theirs."""
    usable = isinstance(model, nn.Module) and onednn_available()  # a policy may be any callable
    layers = [m for m in model.modules() if type(m) is nn.Linear] if usable else []
    for layer in layers:
        layer.forward = types.MethodType(_onednn_forward, layer)
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward


def with_onednn_linears(fn: Callable) -> Callable:
    """Decorator: ``fn(model, ...)`` runs inside :func:`onednn_linears` of its first argument."""

    @functools.wraps(fn)
    def wrapped(model, *args, **kwargs):
        with onednn_linears(model):
            return fn(model, *args, **kwargs)

    return wrapped
