"""Decoding's linear layers on CPU through oneDNN instead of MKL: a CPU-only speed path.

It runs only where :func:`~lit_rlhf.models.cpu_paths.cpu_path_enabled` says so for
``onednn_decode_linears``: a model on the CPU, and the path not switched off
(``LIT_RLHF_CPU_PATHS=0``, see :mod:`lit_rlhf.models.cpu_paths`); on any other device nothing is
touched. It relies on private oneDNN ops (``torch.ops.mkldnn._linear_pointwise`` and
``_reorder_linear_weight``): a torch without them (:func:`onednn_available`) runs ``F.linear``.
The speed-up below was measured at the 8.3M-parameter ``tiny-cpu`` shape, where the weights are
small; ``benchmarks/cpu_paths.py`` measures it at a realistic shape (``small-cpu``).

PyTorch runs a float32 ``nn.Linear`` on CPU as an MKL GEMM. A decode step feeds one token per
sequence, so every linear layer multiplies a few rows by a whole weight matrix, and there MKL
is slow on this project's CPU (AMD EPYC, 2 threads): the 29 linears of the benchmarks'
8.3M-parameter Llama, weights read cold as in a real step, took 5.6 ms at 8 rows and 7.9 ms at
32 through ``F.linear`` against 3.0 and 4.9 ms through oneDNN's linear
(``torch.ops.mkldnn._linear_pointwise``). :func:`~lit_rlhf.modules.rollout.generate` on the
``grpo_varlen`` benchmark's rollout (32 rows, up to 64 tokens) went from 0.72 to 0.56 s, on
PPO's (8 rows, 40 tokens) from 0.37 to 0.29 s (medians of 6 interleaved runs), the same tokens,
log-probs equal to 1e-6. A layer called often in one generation runs on a copy of its weight
packed into oneDNN's blocked layout (:class:`_OneDNNForward`), which took those two to 0.49 and
0.23 s (medians of 5 interleaved processes against 0.56 and 0.27 s), the same tokens.

Only sampling uses it: its log-probs are a logged statistic, while the scoring and update
passes, whose log-probs must agree to the last bit (the step-0 ratio of 1), keep the one kernel
of ``F.linear``. Anything else (a CUDA tensor, autocast, bf16 weights, ``torch.compile``) falls
through to ``F.linear``, as do quantized layers (``nn.Linear`` subclasses with a forward of their
own) and a torch built without oneDNN; a LoRA layer's base and adapter linears are plain
``nn.Linear`` and take the oneDNN path. A layer that already has an instance ``forward`` of its
own (accelerate's hooks of a dispatched or offloaded model set one) is left alone: its forward is
never replaced, nor deleted afterwards.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from lit_rlhf.models.cpu_paths import cpu_path_enabled


def onednn_available() -> bool:
    """Whether this torch has the (private) oneDNN CPU linear kernel and weight packing used here."""
    return (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


def _model_device(model) -> torch.device | None:
    """The device of ``model``'s first parameter (None: not a module, or no parameters)."""
    parameter = next(model.parameters(), None) if isinstance(model, nn.Module) else None
    return None if parameter is None else parameter.device


PACK_AFTER = 8
"""A layer's weight is packed into oneDNN's own blocked layout at the layer's 8th call in a block:
packing a matrix costs about ten decode steps' saving, so a generation of a few tokens (the
prefill and a handful of steps) never pays for it, and a longer one gets it from its 8th step."""

PACK_BUDGET_BYTES = 2**30
"""At most 1 GiB of packed copies per block (the first layers to reach :data:`PACK_AFTER`
calls): a packed weight is a second copy, and beyond this a CPU run's memory matters more."""


def _applies(layer: nn.Linear, x: torch.Tensor) -> bool:
    """Whether oneDNN runs this call: float32 CPU inputs and weights, plain tensors (no DTensor,
    no subclass), the right width (else ``F.linear``'s error, which names the shapes), outside
    autograd and autocast, and outside ``torch.compile`` (which lowers linears its own way)."""
    weight = layer.weight
    return (type(x) is torch.Tensor and type(weight) in (torch.Tensor, nn.Parameter)
            and x.dtype is torch.float32 and weight.dtype is torch.float32 and x.is_cpu and weight.is_cpu
            and x.size(-1) == layer.in_features
            and not torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu")
            and not torch.compiler.is_compiling())


class _OneDNNForward:
    """A plain ``nn.Linear``'s forward inside :func:`onednn_linears`: oneDNN where
    :func:`_applies`, else ``F.linear``; from its :data:`PACK_AFTER`-th oneDNN call on, the weight
    packed once into oneDNN's blocked layout. On the benchmarks' Llama (29 matrices, weights read
    cold) a packed step took 1.6-2.0 ms at 8 rows and 3.4-4.1 at 32 against 3.0-3.9 and
    4.8-5.6 unpacked (oneDNN reorders a plain weight on every call); packing all 29 took 14-20 ms.
    The packed copy is a snapshot, which is why the weights must not change inside the block."""

    def __init__(self, layer: nn.Linear, budget: list[int]) -> None:
        self.layer, self.budget, self.calls, self.packed = layer, budget, 0, None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        layer = self.layer
        if not _applies(layer, x):
            return F.linear(x, layer.weight, layer.bias)
        self.calls += 1
        if self.calls == PACK_AFTER:  # once per layer and block
            size = layer.weight.numel() * layer.weight.element_size()
            if size <= self.budget[0]:
                self.budget[0] -= size
                self.packed = torch.ops.mkldnn._reorder_linear_weight(layer.weight, x.numel() // x.size(-1))
        return _onednn_linear(x, layer.weight if self.packed is None else self.packed, layer.bias)


def _onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """(..., in) @ (out, in).T + (out,) -> (..., out), by oneDNN (no activation fused); ``weight``
    plain or packed by ``torch.ops.mkldnn._reorder_linear_weight``."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


@contextlib.contextmanager
def onednn_linears(model) -> Iterator[None]:
    """A CPU path: within the block, the plain ``nn.Linear`` layers of a CPU ``model`` run on
    oneDNN where :func:`_applies` says so (their weights packed once called often, see
    :class:`_OneDNNForward`; the weights must not change inside the block); their class's
    ``forward`` is back afterwards, also after an error.

    Nothing is touched when :func:`~lit_rlhf.models.cpu_paths.cpu_path_enabled` is false for
    ``onednn_decode_linears`` on the model's device (any device but the CPU, or the path switched
    off), for a ``model`` that is not an ``nn.Module`` (a policy may be any callable), or without
    the oneDNN ops. Subclasses (bitsandbytes' quantized layers) keep their forward, and so does a
    layer with an instance ``forward`` already set (accelerate's hooks): only a forward this
    block set is removed at its end.
    """
    usable = cpu_path_enabled("onednn_decode_linears", _model_device(model)) and onednn_available()
    layers = [m for m in model.modules() if type(m) is nn.Linear and "forward" not in m.__dict__] if usable else []
    budget = [PACK_BUDGET_BYTES]  # bytes of packed copies left, shared by the layers
    ours = [_OneDNNForward(layer, budget) for layer in layers]
    for layer, forward in zip(layers, ours):
        layer.forward = forward
    try:
        yield
    finally:
        for layer, forward in zip(layers, ours):
            if layer.__dict__.get("forward") is forward:  # someone else's, set inside the block, stays
                del layer.forward


def with_onednn_linears(fn: Callable) -> Callable:
    """Decorator: ``fn(model, ...)`` runs inside :func:`onednn_linears` of its first argument
    (a CPU path: a no-op for a model on any other device)."""

    @functools.wraps(fn)
    def wrapped(model, *args, **kwargs):
        with onednn_linears(model):
            return fn(model, *args, **kwargs)

    return wrapped
