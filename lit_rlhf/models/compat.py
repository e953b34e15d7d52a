"""The one place that knows how the KV cache is named across the transformers versions we support.

transformers 5.16-5.19 (the range vLLM 0.32 accepts) take ``past_key_values=`` and return
``output.past_key_values``; later 5.x versions renamed both to ``cache`` (the old name still
accepted as an argument, with a warning). Both are public arguments; only the name moved.
"""

from __future__ import annotations

import functools
import inspect

from torch import nn


@functools.cache
def _cache_argument(forward_type: type) -> str:
    signature = inspect.signature(forward_type.forward)
    return "cache" if "cache" in signature.parameters else "past_key_values"


def cache_kwargs(model: nn.Module, cache) -> dict:
    """``{name: cache}`` under the name ``model.forward`` takes (``cache`` or ``past_key_values``)."""
    return {_cache_argument(type(model)): cache}


def output_cache(output):
    """The KV cache a model output returned (``output.cache`` or ``output.past_key_values``)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)


def activation_checkpointing(model) -> bool:
    """Whether a transformers model has activation (gradient) checkpointing on: the property is
    ``is_gradient_checkpointing`` in 5.16-5.19 and ``is_activation_checkpointing`` later (the old
    name deprecated there, so the new one is read where the class has it)."""
    name = "is_activation_checkpointing" if hasattr(type(model), "is_activation_checkpointing") else \
        "is_gradient_checkpointing"
    return bool(getattr(model, name, False))
