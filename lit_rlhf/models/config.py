"""What a model is and how it is held in memory: :class:`ModelConfig` and :class:`LoraSettings`.

A model comes from one of two sources:

* ``name_or_path``: a hub id, a local directory, or a registered name (see
  :mod:`lit_rlhf.models.sources`), loaded with ``from_pretrained``;
* ``arch``: an architecture config with random init (the demo and the tests), given as a
  registered name, a path to a ``config.json``, or a dict of config fields with ``model_type``.

Then, in this order: optional bitsandbytes quantization of the frozen base (8-bit LLM.int8
or 4-bit NF4/FP4), k-bit training preparation, gradient checkpointing, and either LoRA
adapters (peft) or full fine-tuning. :class:`ModelConfig` validates all of it at
construction, so a bad config fails before any weights are read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from lit_rlhf.models.sources import registered_arch, resolve_path
from lit_rlhf.models.templates import resolve_template

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
    """Random init: a registered name (``"demo-tiny"``), a ``config.json`` path, or a dict with ``model_type``."""
    tokenizer: str | None = None
    """Hub id, local directory or registered name (``"demo"``); defaults to ``name_or_path``."""
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
    attn_implementation: str | None = None
    """``sdpa``, ``eager``, ``flash_attention_2``; None: ``sdpa`` where the architecture supports it, else ``eager``."""
    trust_remote_code: bool = False
    """Run code shipped with a hub model. Off by default: it executes arbitrary code."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) to load."""
    chat_template: str | None = None
    """For conversational data: a built-in template (``chatml``, ``chatml-system``, ``llama3``) or a
    Jinja file, replacing the tokenizer's own; None keeps the tokenizer's."""
    seed: int = 0
    """Seed of the random init (``arch``), identical on every rank."""

    def __post_init__(self) -> None:
        if (self.name_or_path is None) == (self.arch is None):
            raise ValueError("model.init_args.lm: give exactly one of `name_or_path` and `arch`")
        if self.tokenizer is None:
            if self.name_or_path is None:
                raise ValueError("model.init_args.lm.tokenizer is required when the model is built from `arch`")
            self.tokenizer = self.name_or_path
        for name, kind in (("name_or_path", "model"), ("tokenizer", "tokenizer")):
            value = getattr(self, name)
            if isinstance(value, str):
                check_reference(value, f"model.init_args.lm.{name}", kind)
        if self.chat_template is not None:
            resolve_template(self.chat_template)  # a name or file that exists, checked now
        if isinstance(self.lora, dict):  # when built from plain Python rather than the CLI
            self.lora = LoraSettings(**self.lora)
        if self.quantization != "none" and self.lora is None:
            raise ValueError(
                f"model.init_args.lm.quantization={self.quantization!r} needs `lora`: quantized weights are "
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


def looks_local(name_or_path: str) -> bool:
    """True for what can only be a local path, never a hub id: ``/x``, ``./x``, ``../x``, ``~/x``,
    or more than one ``/`` (a hub id is ``name`` or ``org/name``)."""
    return name_or_path.startswith(("/", "./", "../", "~")) or name_or_path.strip("/").count("/") >= 2


Kind = Literal["model", "reward model", "tokenizer"]

# The folder a finished run exports each kind to (RM stage: export/; SFT/DPO/PPO: model/ or adapter/).
_EXPORTS = {"reward model": ("export",), "model": ("model", "adapter", "export"),
            "tokenizer": ("model", "adapter", "export")}


def check_reference(value: str, where: str, kind: Kind = "model") -> None:
    """A config's reference to a local model, reward model or tokenizer, checked before any
    weights load: a missing path, a training run's folder instead of its export, a folder that
    holds no model, or (for a reward model) a language model are one line naming ``where``.

    Hub ids and registered names (``demo-rm``) are left to the loader; a local path never
    falls through to the hub.
    """
    from lit_rlhf.models.sources import registered_names

    path = Path(value).expanduser()
    if not path.exists():
        # `runs/rm` where `runs/` exists is a path too, not the hub id of an organisation `runs`.
        local = looks_local(value) or (len(path.parts) > 1 and path.parent.is_dir())
        if local and value not in registered_names():
            raise FileNotFoundError(f"{where}: no such directory {value!r}")
        return  # a hub id or a registered name
    if path.is_dir() and not (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
        run = _run_export(path, kind)
        if run is not None:
            raise ValueError(f"{where}: {value} is a training run's folder, not a {kind}; give {run}")
        if kind != "tokenizer" or not any(path.glob("tokenizer*")):
            raise ValueError(f"{where}: {value} holds no config.json: not a transformers {kind} folder")
    if kind == "reward model" and (path / "config.json").is_file():
        import json

        architectures = json.loads((path / "config.json").read_text()).get("architectures") or []
        if architectures and not any(a.endswith("ForSequenceClassification") for a in architectures):
            raise ValueError(f"{where}: {value} is a {architectures[0]}, not a reward model (give the RM stage's "
                             "export/ folder, a sequence-classification model with one output)")


def _run_export(path: Path, kind: Kind) -> Path | None:
    """The newest export of ``kind`` inside a run's folder (a run root with ``lightning_logs/``,
    or one ``version_N``), or None if ``path`` is no run folder."""
    runs = sorted([*path.glob("lightning_logs/version_*"), *path.glob("version_*")],
                  key=lambda p: p.stat().st_mtime) or [path]
    for run in reversed(runs):
        for sub in _EXPORTS[kind]:
            if (run / sub / "config.json").is_file() or (run / sub / "adapter_config.json").is_file():
                return run / sub
    if (path / "lightning_logs").is_dir() or (path / "config.yaml").is_file() or path.name == "lightning_logs":
        expected = " or ".join(f"{sub}/" for sub in _EXPORTS[kind])
        return Path(f"{path}/lightning_logs/version_N/{expected} of a finished run (none is there yet)")
    return None


def _arch_fields(arch: str | dict) -> dict:
    if isinstance(arch, dict):
        fields = dict(arch)
    elif (named := registered_arch(arch)) is not None:
        fields = named
    else:
        path = Path(arch)
        if not path.is_file():
            raise FileNotFoundError(f"model.init_args.lm.arch: no such config file or registered name {arch!r}")
        fields = json.loads(path.read_text())
    if "model_type" not in fields:
        raise ValueError(f"model.init_args.lm.arch {arch!r} has no `model_type` field")
    return fields


def max_positions(config) -> int | None:
    """The longest sequence the architecture accepts, where the config says so."""
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None
