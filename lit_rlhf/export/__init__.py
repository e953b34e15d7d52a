"""Export: merge LoRA adapters into their base and save a plain transformers model."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from lit_rlhf.models import (
    DType,
    ModelConfig,
    Task,
    from_pretrained_checked,
    load_model,
    save_pretrained_atomic,
)
from lit_rlhf.models.loading import auto_class


def loads_back(task: Task):
    """A check that a written model folder loads with transformers alone (every weight file read
    and covered), run before the folder is renamed into place."""
    def check(folder: Path) -> None:
        from_pretrained_checked(auto_class(task), str(folder), dtype="auto")

    return check


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
    # A reward model's score head comes with its adapter (modules_to_save), not the base.
    base = load_model(base_cfg, tokenizer, task=task, new_head=task == "seq_cls")
    try:
        model = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    except Exception as err:  # safetensors' SafetensorError has no common base with OSError
        if not isinstance(err, (OSError, ValueError, RuntimeError)) and type(err).__name__ != "SafetensorError":
            raise
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{adapter_dir}: cannot read the adapter (truncated or corrupt?): {first}") from err
    model.config.use_cache = True  # the exported model is for inference and generation
    return save_pretrained_atomic(model, out_dir, tokenizer, check=loads_back(task), **meta)


def export_run(run_dir: str | Path, out_dir: str | Path, dtype: DType | None = None) -> Path:
    """Export a finished run (``lightning_logs/version_N``) as a plain HF model.

    Reads the run's ``config.yaml`` to know the base model and the task; merges
    ``adapter/`` into the base (LoRA runs) or reads ``model/`` (full fine-tuning; ``export/``
    for a reward model), in ``dtype`` (default: the run's ``lm.dtype``). Every weight file read
    is checked (a truncated one is a one-line ``ValueError``), and the written model is loaded
    back once before its folder replaces ``out_dir``.
    """
    import torch
    import yaml

    from lit_rlhf.models import load_tokenizer

    run_dir = Path(run_dir)
    config_file = run_dir / "config.yaml"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} not found: pass a run directory (lightning_logs/version_N)")
    model = yaml.safe_load(config_file.read_text())["model"]
    lm = ModelConfig(**model["init_args"]["lm"])
    task: Task = "seq_cls" if model["class_path"].endswith("RewardModule") else "causal_lm"
    tokenizer = load_tokenizer(lm.tokenizer, trust_remote_code=lm.trust_remote_code, chat_template=lm.chat_template)
    if (run_dir / "adapter").is_dir():
        return merge_adapter(lm, run_dir / "adapter", out_dir, tokenizer=tokenizer, task=task,
                             dtype=dtype or lm.dtype)
    source = run_dir / ("export" if task == "seq_cls" else "model")
    if not source.is_dir():
        raise FileNotFoundError(f"{run_dir}: no adapter/ or {source.name}/ to export (did the run finish?)")
    # Full fine-tuning: read the run's model (every weight file checked), in `dtype`, and write it anew.
    meta_file = source / "lit_rlhf.json"
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    hf_model = from_pretrained_checked(auto_class(task), str(source), dtype=getattr(torch, dtype or lm.dtype))
    hf_model.config.use_cache = True
    return save_pretrained_atomic(hf_model, out_dir, tokenizer, check=loads_back(task), **meta)
