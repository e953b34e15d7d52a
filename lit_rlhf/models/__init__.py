"""Models: what a model is (:class:`ModelConfig`), how it loads, and the roles built on one base.

* :mod:`~lit_rlhf.models.config`: :class:`ModelConfig`, :class:`LoraSettings` (validated at
  construction);
* :mod:`~lit_rlhf.models.sources`: registered names (``demo``, ``demo-sft``, ...) resolved
  before hub ids and paths;
* :mod:`~lit_rlhf.models.loading`: tokenizer and model loading: weights, 8-/4-bit
  quantization, gradient checkpointing, LoRA;
* :mod:`~lit_rlhf.models.heads`: the policy + value head on one shared trunk (PPO); a reward
  model's last block run at the scored tokens only;
* :mod:`~lit_rlhf.models.adapters`: a reward model as a second adapter on the policy's base;
* :mod:`~lit_rlhf.models.attention`: per-sequence attention for packed rows (reward model);
* :mod:`~lit_rlhf.models.saving`: atomic ``save_pretrained``.
"""

from lit_rlhf.models.config import (
    DType,
    LoraSettings,
    ModelConfig,
    Quantization,
    Task,
    max_positions,
)
from lit_rlhf.models.heads import PolicyOutput, PolicyWithValueHead, unwrap_peft
from lit_rlhf.models.loading import (
    attention_for,
    check_quantization,
    compute_dtype_for,
    disable_cpu_4bit_repacking,
    from_pretrained_checked,
    load_model,
    load_tokenizer,
    trainable_parameters,
)
from lit_rlhf.models.saving import atomic_dir, remove_stale_temporaries, save_pretrained_atomic
from lit_rlhf.models.sources import register_arch, register_path, resolve_path

__all__ = [
    "DType",
    "LoraSettings",
    "ModelConfig",
    "PolicyOutput",
    "PolicyWithValueHead",
    "Quantization",
    "Task",
    "atomic_dir",
    "attention_for",
    "check_quantization",
    "compute_dtype_for",
    "disable_cpu_4bit_repacking",
    "from_pretrained_checked",
    "load_model",
    "load_tokenizer",
    "max_positions",
    "register_arch",
    "register_path",
    "remove_stale_temporaries",
    "resolve_path",
    "save_pretrained_atomic",
    "trainable_parameters",
    "unwrap_peft",
]
