"""Model and tokenizer loading, in one place, for every stage.

A model comes from one of two sources:

* ``name_or_path``: a hub id or a local directory, loaded with ``from_pretrained``;
* ``arch``: an architecture config with random init (the demo and the tests), given as
  ``"demo-tiny"``, a path to a ``config.json``, or a dict of config fields with ``model_type``.

Then, in this order: optional bitsandbytes quantization of the frozen base (8-bit LLM.int8
or 4-bit NF4/FP4), k-bit training preparation, gradient checkpointing, and either LoRA
adapters (peft) or full fine-tuning. :class:`ModelConfig` validates all of it at
construction, so a bad config fails before any weights are read.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

log = logging.getLogger(__name__)

DEMO = "demo"  # tokenizer spec of the built-in offline demo (see lit_rlhf.demo)
DEMO_ARCH = "demo-tiny"  # arch spec of the demo's tiny Llama

Quantization = Literal["none", "8bit", "4bit-nf4", "4bit-fp4"]
DType = Literal["float32", "bfloat16", "float16"]
Task = Literal["causal_lm", "seq_cls"]


@dataclass
class LoraSettings:
    """LoRA adapter hyper-parameters (peft)."""

    r: int = 8
    """Rank of the low-rank update."""
    alpha: int = 16
    """Scaling numerator: the update is scaled by alpha / r."""
    dropout: float = 0.05
    """Dropout on the adapter input."""
    target_modules: list[str] | str | None = None
    """Module names to adapt, ``"all-linear"``, or None for peft's default for the architecture."""
    modules_to_save: list[str] | None = None
    """Modules trained in full and saved with the adapter (e.g. ``[embed_tokens, lm_head]``)."""

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"lora.r must be >= 1, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout}")


@dataclass
class ModelConfig:
    """Where a model's weights come from and how they are held in memory."""

    name_or_path: str | None = None
    """Hub id or local directory for ``from_pretrained``. Exactly one of this and ``arch``."""
    arch: str | dict | None = None
    """Random init from ``"demo-tiny"``, a ``config.json`` path, or a dict with ``model_type``."""
    tokenizer: str | None = None
    """Hub id, local directory or ``"demo"``; defaults to ``name_or_path``."""
    dtype: DType = "float32"
    """Dtype of the loaded (non-quantized) weights; adapters are kept in float32 by peft."""
    quantization: Quantization = "none"
    """Quantize the frozen base with bitsandbytes: 8-bit LLM.int8 or 4-bit NF4/FP4."""
    double_quant: bool = True
    """4-bit only: also quantize the quantization constants (saves ~0.4 bit/param)."""
    lora: LoraSettings | None = None
    """LoRA adapters on a frozen base; None means full fine-tuning."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (less memory, ~30% more compute)."""
    attn_implementation: str = "sdpa"
    """``sdpa``, ``eager`` or ``flash_attention_2``; all honour packed ``position_ids``."""
    trust_remote_code: bool = False
    """Run code shipped with a hub model. Off by default: it executes arbitrary code."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) to load."""
    seed: int = 0
    """Seed of the random init (``arch``), identical on every rank."""

    def __post_init__(self) -> None:
        if (self.name_or_path is None) == (self.arch is None):
            raise ValueError("model: give exactly one of `name_or_path` and `arch`")
        if self.tokenizer is None:
            if self.name_or_path is None:
                raise ValueError("model.tokenizer is required when the model is built from `arch`")
            self.tokenizer = self.name_or_path
        if isinstance(self.lora, dict):  # when built from plain Python rather than the CLI
            self.lora = LoraSettings(**self.lora)
        if self.quantization != "none" and self.lora is None:
            raise ValueError(
                f"model.quantization={self.quantization!r} needs `lora`: quantized weights are "
                "frozen, so only adapters can be trained"
            )

    @property
    def quantized(self) -> bool:
        return self.quantization != "none"

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def architecture(self, tokenizer=None):
        """The ``PretrainedConfig`` without reading any weights (for early validation)."""
        from transformers import AutoConfig, PretrainedConfig

        if self.name_or_path is not None:
            return AutoConfig.from_pretrained(
                resolve_path(self.name_or_path), revision=self.revision, trust_remote_code=self.trust_remote_code
            )
        fields = _arch_fields(self.arch)
        if tokenizer is not None:
            # The demo and test archs take their vocabulary and special ids from the tokenizer.
            fields.setdefault("vocab_size", len(tokenizer))
            for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
                fields.setdefault(name, getattr(tokenizer, name))
        model_type = fields.pop("model_type")
        config = AutoConfig.for_model(model_type, **fields)
        assert isinstance(config, PretrainedConfig)
        return config


def resolve_path(name_or_path: str) -> str:
    """Hub id or directory; the demo's ``demo-sft``/``demo-rm`` are built on first use."""
    from lit_rlhf.demo.models import ensure_demo_model, is_demo_model

    return str(ensure_demo_model(name_or_path)) if is_demo_model(name_or_path) else name_or_path


def _arch_fields(arch: str | dict) -> dict:
    if isinstance(arch, dict):
        fields = dict(arch)
    elif arch == DEMO_ARCH:
        from lit_rlhf.demo import TINY_LLAMA

        fields = {"model_type": "llama", **TINY_LLAMA}
    else:
        path = Path(arch)
        if not path.is_file():
            raise FileNotFoundError(f"model.arch: no such config file {arch!r} (or use {DEMO_ARCH!r})")
        fields = json.loads(path.read_text())
    if "model_type" not in fields:
        raise ValueError(f"model.arch {arch!r} has no `model_type` field")
    return fields


def max_positions(config) -> int | None:
    """The longest sequence the architecture accepts, where the config says so."""
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None


# --------------------------------------------------------------------------------------------
# Tokenizer


def load_tokenizer(spec: str, *, trust_remote_code: bool = False):
    """Load a tokenizer (hub id, local dir or ``"demo"``) and make sure it can pad.

    Tokenizers without a pad token (GPT-2, Llama) pad with EOS; one without EOS cannot
    mark where documents end, so it is refused.
    """
    from transformers import AutoTokenizer

    if spec == DEMO:
        from lit_rlhf.demo import prepare_demo

        spec = str(prepare_demo().tokenizer_dir)
    tokenizer = AutoTokenizer.from_pretrained(resolve_path(spec), trust_remote_code=trust_remote_code)
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer {spec!r} has no EOS token: packing and generation need one")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# --------------------------------------------------------------------------------------------
# Model


def check_quantization(quantization: str, device: torch.device) -> None:
    """Fail early, in one line, where bitsandbytes cannot run the requested quantization."""
    if quantization == "none":
        return
    try:
        import bitsandbytes  # noqa: F401
    except Exception as err:  # ImportError, or a broken native library
        raise RuntimeError(
            f"model.quantization={quantization!r} needs bitsandbytes, which failed to import: {err}"
        ) from err
    if device.type not in ("cuda", "cpu", "xpu"):
        raise RuntimeError(
            f"model.quantization={quantization!r}: bitsandbytes does not run on device {device.type!r}"
        )


def _bnb_config(cfg: ModelConfig):
    from transformers import BitsAndBytesConfig

    if cfg.quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=cfg.quantization.removeprefix("4bit-"),
        bnb_4bit_use_double_quant=cfg.double_quant,
        # Matmuls in the dtype of the rest of the model (bf16 on GPU recipes).
        bnb_4bit_compute_dtype=cfg.torch_dtype,
    )


def _auto_class(task: Task):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    return AutoModelForCausalLM if task == "causal_lm" else AutoModelForSequenceClassification


def load_model(
    cfg: ModelConfig,
    tokenizer,
    *,
    task: Task = "causal_lm",
    device: torch.device | str | None = None,
) -> nn.Module:
    """Build the model described by ``cfg``: weights, quantization, checkpointing, LoRA.

    Args:
        tokenizer: supplies vocab size and special ids for ``arch`` models and the pad id
            that sequence classification needs to find the last real token.
        task: ``causal_lm`` (SFT, PPO policy) or ``seq_cls`` with one output (reward model).
        device: where quantized weights are placed. Quantized weights cannot be moved after
            loading, so under DDP each rank passes its own device; unquantized models load
            on CPU and the Trainer moves them.
    """
    device = torch.device(device or "cpu")
    check_quantization(cfg.quantization, device)
    extra = {"num_labels": 1} if task == "seq_cls" else {}
    kwargs: dict = {"dtype": cfg.torch_dtype, "attn_implementation": cfg.attn_implementation}

    with contextlib.ExitStack() as stack:
        if cfg.name_or_path is not None:
            source = resolve_path(cfg.name_or_path)
            kwargs.update(revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
        else:
            config = cfg.architecture(tokenizer)
            for key, value in extra.items():
                setattr(config, key, value)
            with _seeded(cfg.seed):
                model = _auto_class(task).from_config(config, **kwargs)
            if not cfg.quantized:
                return _finish(model, cfg, task, tokenizer)
            # bitsandbytes quantizes while loading, so the random init goes through a
            # (temporary) checkpoint like any pretrained model.
            source = stack.enter_context(tempfile.TemporaryDirectory(prefix="lit_rlhf_init_"))
            model.save_pretrained(source)
            del model

        if cfg.quantized:
            kwargs.update(quantization_config=_bnb_config(cfg), device_map={"": device})
        model = _auto_class(task).from_pretrained(source, **extra, **kwargs)
    return _finish(model, cfg, task, tokenizer)


def _finish(model: nn.Module, cfg: ModelConfig, task: Task, tokenizer) -> nn.Module:
    if task == "seq_cls" and model.config.pad_token_id is None:
        # The score is read at the last non-pad token, found through pad_token_id.
        model.config.pad_token_id = tokenizer.pad_token_id
    model.config.use_cache = False  # training; generation turns the cache on explicitly
    # from_pretrained returns eval mode and Lightning keeps module modes as it finds them:
    # without this, dropout (and LoRA dropout) would be silently off during training.
    model.train()

    if cfg.quantized:
        from peft import prepare_model_for_kbit_training

        disable_cpu_4bit_repacking(model)
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=cfg.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    elif cfg.gradient_checkpointing:
        # Non-reentrant checkpointing works with frozen inputs (LoRA) and with DDP.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    if cfg.lora is None:
        return model
    from peft import LoraConfig, TaskType, get_peft_model

    lora = LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=cfg.lora.target_modules,
        modules_to_save=cfg.lora.modules_to_save,
        task_type=TaskType.CAUSAL_LM if task == "causal_lm" else TaskType.SEQ_CLS,
        # SEQ_CLS marks the score head as `modules_to_save`: trained and saved with the adapter.
    )
    return get_peft_model(model, lora)


def disable_cpu_4bit_repacking(model: nn.Module) -> int:
    """Keep gradients through CPU 4-bit layers exact; returns how many layers were changed.

    bitsandbytes 0.50 repacks a ``Linear4bit`` weight into a CPU-only layout on its first
    eval-mode, no-grad forward when the CPU has AVX512-BF16. Gradients through that layer
    are silently wrong afterwards (median relative error 0.36 measured against a dequantized
    fp32 reference). A PPO rollout is exactly such a forward. Turning the fast path off
    keeps the layout that the backward pass understands.
    """
    try:
        from bitsandbytes.nn import Linear4bit
    except Exception:
        return 0
    changed = 0
    for module in model.modules():
        if isinstance(module, Linear4bit) and getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            changed += 1
    return changed


@contextlib.contextmanager
def _seeded(seed: int):
    """Seed the random init without disturbing the caller's RNG stream."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


# --------------------------------------------------------------------------------------------
# Atomic saving


@contextlib.contextmanager
def atomic_dir(target: str | Path):
    """Yield a temporary directory that replaces ``target`` only if the block succeeds.

    Readers never see a half-written adapter or export: the old directory stays until the
    new one is complete, then ``os.replace`` swaps them.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp", dir=target.parent))
    try:
        yield tmp
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.old{os.getpid()}")
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            _rmtree(old)
    except BaseException:
        _rmtree(tmp)
        raise


def _rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def save_pretrained_atomic(model: nn.Module, target: str | Path, tokenizer=None, **meta) -> Path:
    """``save_pretrained`` (safetensors) into ``target`` atomically, plus the tokenizer.

    ``meta`` is written to ``target/lit_rlhf.json`` (e.g. reward statistics, step).
    """
    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if meta:
            (tmp / "lit_rlhf.json").write_text(json.dumps(meta, indent=2))
    return Path(target)


__all__ = [
    "DEMO",
    "DEMO_ARCH",
    "LoraSettings",
    "ModelConfig",
    "atomic_dir",
    "check_quantization",
    "disable_cpu_4bit_repacking",
    "load_model",
    "load_tokenizer",
    "max_positions",
    "save_pretrained_atomic",
    "trainable_parameters",
]
