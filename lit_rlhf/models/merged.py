"""A model's weights as a plain transformers checkpoint would hold them, computed aside.

A rollout engine (vLLM) runs its own copy of the policy: it needs, at every sync, each weight
under its checkpoint name with any LoRA adapter merged in and any 4-/8-bit base dequantized.
:func:`merged_weights` yields exactly that, one tensor at a time, without touching the trained
modules (no ``merge_adapter``/``unmerge_adapter`` round trip, which rounds a quantized or
16-bit base a little differently each time).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from lit_rlhf.models.heads import unwrap_peft


def _plain(tensor: torch.Tensor) -> torch.Tensor:
    """A parameter's full value: a bitsandbytes 4-/8-bit weight dequantized."""
    if type(tensor).__name__ in ("Params4bit", "Int8Params"):
        from types import SimpleNamespace

        from peft.utils.integrations import dequantize_bnb_weight

        # 4-bit: the weight carries its quant_state; 8-bit: its per-row scales (SCB).
        return dequantize_bnb_weight(tensor, SimpleNamespace(SCB=getattr(tensor, "SCB", None)))
    return tensor.detach()


def merged_weights(lm: nn.Module, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` for every parameter of ``lm``'s transformers model under its checkpoint
    name (``model.layers.0.self_attn.q_proj.weight``, ``lm_head.weight``), in ``dtype`` (None: each
    parameter's own; a quantized base: the dequantized dtype).

    A LoRA layer gives its base weight plus ``get_delta_weight`` of each active adapter (peft's
    own ``scaling * B @ A``, transposed for fan-in-fan-out layers); its adapter matrices are not
    yielded. A tied weight is yielded once, under its first name (the input embedding).
    Sharded (FSDP2) models are refused: their weights would have to be gathered a layer at a time.
    """
    from peft.tuners.lora import LoraLayer
    from torch.distributed.tensor import DTensor

    base = unwrap_peft(lm)
    seen: set[int] = set()
    skip: list[str] = []  # prefixes of modules already yielded whole (a LoRA layer's insides)
    for prefix, module in base.named_modules():
        if any(prefix.startswith(s) for s in skip):
            continue
        if isinstance(module, LoraLayer):
            skip.append(prefix + ".")
            layer = module.get_base_layer()
            weight = _plain(layer.weight).float()
            for adapter in module.active_adapters:
                if adapter in module.lora_A and not module.merged:
                    weight = weight + module.get_delta_weight(adapter).float()
            named = [("weight", weight)] + ([("bias", layer.bias)] if getattr(layer, "bias", None) is not None else [])
        else:
            named = list(module.named_parameters(recurse=False))
        for name, tensor in named:
            if isinstance(tensor, DTensor):
                raise NotImplementedError("merged_weights: the model is sharded (fsdp2); a rollout engine is not "
                                          "supported under the fsdp2 strategy yet")
            if isinstance(tensor, nn.Parameter):  # a tied parameter: once (a computed tensor's id may be reused)
                if id(tensor) in seen:
                    continue
                seen.add(id(tensor))
            value = _plain(tensor)
            yield (f"{prefix}.{name}" if prefix else name), value if dtype is None else value.to(dtype)
