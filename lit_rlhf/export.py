"""Export: merge LoRA adapters into their base and save a plain transformers model."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from lit_rlhf.models import DType, ModelConfig, Task, load_model, save_pretrained_atomic


def merge_adapter(
    lm: ModelConfig,
    adapter_dir: str | Path,
    out_dir: str | Path,
    *,
    tokenizer,
    task: Task = "causal_lm",
    dtype: DType = "float32",
    **meta,
) -> Path:
    """Load the base unquantized in ``dtype``, apply the adapter, merge, save atomically.

    A quantized training base is reloaded in full precision for the merge: merging into
    8-/4-bit weights would round the update away (the usual QLoRA practice). The result loads
    with ``AutoModelForCausalLM`` / ``AutoModelForSequenceClassification`` alone; ``meta``
    goes to ``lit_rlhf.json`` beside it.
    """
    from peft import PeftModel

    base_cfg = dataclasses.replace(lm, quantization="none", lora=None, dtype=dtype, gradient_checkpointing=False)
    base = load_model(base_cfg, tokenizer, task=task)
    model = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    model.config.use_cache = True  # the exported model is for inference and generation
    return save_pretrained_atomic(model, out_dir, tokenizer, **meta)
