"""Build a tokenizer and a model from a :class:`~lit_rlhf.models.config.ModelConfig`.

Weights, then quantization (bitsandbytes), k-bit preparation, gradient checkpointing and
LoRA (peft), in that order; the same function serves every stage and role.
"""

from __future__ import annotations

import contextlib
import sys
import tempfile

import torch
from torch import nn

from lit_rlhf.models.attention import is_flash_attention
from lit_rlhf.models.config import ModelConfig, Task
from lit_rlhf.models.sources import resolve_path
from lit_rlhf.models.templates import resolve_template


def load_tokenizer(spec: str, *, trust_remote_code: bool = False, chat_template: str | None = None):
    """Load a tokenizer (hub id, local dir or registered name) and make sure it can pad.

    Tokenizers without a pad token (GPT-2, Llama) pad with EOS; one without EOS cannot
    mark where documents end, so it is refused. ``chat_template`` (a built-in name or a
    Jinja file, see :mod:`lit_rlhf.models.templates`) replaces the tokenizer's own template;
    ``save_pretrained`` then writes it with the model.
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_path(spec), trust_remote_code=trust_remote_code)
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer {spec!r} has no EOS token: packing and generation need one")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if chat_template is not None:
        tokenizer.chat_template = resolve_template(chat_template)
    return tokenizer


def check_quantization(quantization: str, device: torch.device) -> None:
    """Fail early, in one line, where bitsandbytes cannot run the requested quantization."""
    if quantization == "none":
        return
    try:
        import bitsandbytes  # noqa: F401
    except Exception as err:  # ImportError, or a broken native library
        raise RuntimeError(
            f"model.init_args.lm.quantization={quantization!r} needs bitsandbytes, which failed to import: {err}"
        ) from err
    if device.type not in ("cuda", "cpu", "xpu"):
        raise RuntimeError(
            f"model.init_args.lm.quantization={quantization!r}: bitsandbytes does not run on device {device.type!r}"
        )


def bnb_config(quantization: str, compute_dtype: torch.dtype, double_quant: bool = True):
    """transformers' ``BitsAndBytesConfig`` for ``8bit``, ``4bit-nf4`` or ``4bit-fp4``."""
    from transformers import BitsAndBytesConfig

    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quantization.removeprefix("4bit-"),
        bnb_4bit_use_double_quant=double_quant,
        # Matmuls in the dtype of the rest of the model (bf16 on GPU recipes).
        bnb_4bit_compute_dtype=compute_dtype,
    )


def compute_dtype_for(precision: str | int | None, weights: torch.dtype) -> torch.dtype:
    """The dtype a quantized base's 4-bit matmuls run in under the trainer's ``precision``.

    bitsandbytes runs its own 4-bit kernel in the layer's compute dtype, outside autocast, and
    for other batch shapes dequantizes and calls ``F.linear``, which autocast runs in 16-bit.
    The rollout's no-grad pass and the update's grad pass take different shapes: unless the
    compute dtype is autocast's, PPO's first ratio is not 1 on CUDA. So: bfloat16 under
    ``bf16-*``, float16 under ``16-*``, else the weights' dtype.
    """
    p = str(precision or "")
    if p.startswith("bf16"):
        return torch.bfloat16
    if p.startswith("16"):
        return torch.float16
    return weights


def auto_class(task: Task):
    """``AutoModelForCausalLM`` or ``AutoModelForSequenceClassification`` for ``task``."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    return AutoModelForCausalLM if task == "causal_lm" else AutoModelForSequenceClassification


_KNOWN_ATTENTION = ("eager", "sdpa", "flash_attention_2", "flash_attention_3", "flash_attention_4", "flex_attention")
# flash_attention_N -> (the package that provides it, the hub kernel transformers falls back to)
_FLASH_SOURCES = {
    "flash_attention_2": ("flash_attn", "kernels-community/flash-attn2"),
    "flash_attention_3": ("flash_attn_interface", "kernels-community/vllm-flash-attn3"),
    "flash_attention_4": ("flash_attn.cute", "kernels-community/flash-attn4"),
}


def attention_for(cfg: ModelConfig, config, task: Task = "causal_lm") -> str:
    """The attention implementation to load with, checked against the architecture's support.

    Also fails, in one line, where transformers has no class for ``task`` (e.g. Granite has
    no sequence-classification head, so it cannot be a reward model).

    ``cfg.attn_implementation=None`` picks ``sdpa`` where the model class supports it, else
    ``eager`` (Gemma2 and BLOOM refuse ``sdpa``). An explicit choice the class does not support,
    or a flash attention whose package or hub kernel is not installed here, is a one-line error
    here, before any weights are read.
    """
    cls = auto_class(task)._model_mapping.get(type(config), None)
    if cls is None:
        if cfg.trust_remote_code:  # the class comes with the checkpoint: let transformers decide
            return cfg.attn_implementation
        kind = "causal-LM" if task == "causal_lm" else "sequence-classification (reward model)"
        raise ValueError(f"model {cfg.name_or_path or config.model_type}: transformers has no {kind} class "
                         f"for model_type {config.model_type!r}")
    supported = ["eager"]
    supported += ["sdpa"] if getattr(cls, "_supports_sdpa", False) else []
    flash = getattr(cls, "_supports_flash_attn", False)
    supported += ["flash_attention_2", "flash_attention_3", "flash_attention_4"] if flash else []
    supported += ["flex_attention"] if getattr(cls, "_supports_flex_attn", False) else []
    choice = cfg.attn_implementation
    if choice is None:
        return "sdpa" if "sdpa" in supported else "eager"
    if (choice in _KNOWN_ATTENTION and choice not in supported) or (is_flash_attention(choice) and not flash):
        raise ValueError(f"model.init_args.lm.attn_implementation={choice!r}: {cls.__name__} supports {', '.join(supported)}")
    if (missing := flash_unavailable(choice)) is not None:
        raise ValueError(f"model.init_args.lm.attn_implementation={choice!r}: {missing} (or use sdpa)")
    return choice


def flash_unavailable(choice: str) -> str | None:
    """Why flash attention ``choice`` cannot run here without a download, or None.

    ``flash_attention_N`` runs from its package (``flash_attn`` for 2); without it transformers
    fetches a hub kernel (``kernels-community/flash-attn2``) through the ``kernels`` package,
    which an offline cluster cannot do. A hub kernel named directly must be in the local hub
    cache. Other registered names (a user's own kernel) are taken as they are.
    """
    if not is_flash_attention(choice):
        return None
    if choice in _FLASH_SOURCES:
        package, kernel = _FLASH_SOURCES[choice]
        if _importable(package):
            return None
        source = f"the {package.split('.')[0]} package is not installed and its hub kernel {kernel}"
    elif "/" in choice:
        kernel = choice.split("@")[0].split(":")[0]
        source = f"the hub kernel {kernel}"
    else:
        return None
    if not _importable("kernels"):
        return f"{source} needs the `kernels` package, which is not installed"
    try:
        from huggingface_hub import snapshot_download

        snapshot_download(kernel, local_files_only=True)
    except Exception:
        return (f"{source} is not in the local hub cache (fetch it once where there is network: "
                f"python -c \"from kernels import get_kernel; get_kernel('{kernel}')\")")
    return None


def _importable(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a dotted name whose parent package is missing
        return False


def dropout_fields(config) -> list[str]:
    """Names of the config's dropout probabilities (``*dropout*``, ``*pdrop*``) that are not 0.

    Dropout is not only ``nn.Dropout`` modules: OPT calls ``F.dropout(p=self.dropout)`` with a
    config float, Llama/Qwen/NeoX read ``attention_dropout``. Zeroing the fields before the
    model is built is the only way to switch all of it off.
    """
    names = []
    for name, value in config.to_dict().items():
        if ("dropout" in name or "pdrop" in name) and isinstance(value, float) and value != 0.0:
            names.append(name)
    return names


def load_model(
    cfg: ModelConfig,
    tokenizer,
    *,
    task: Task = "causal_lm",
    device: torch.device | str | None = None,
    dropout: bool = True,
    new_head: bool = False,
    compute_dtype: torch.dtype | None = None,
) -> nn.Module:
    """Build the model described by ``cfg``: weights, quantization, checkpointing, LoRA.

    Args:
        tokenizer: supplies vocab size and special ids for ``arch`` models and the pad id
            that sequence classification needs to find the last real token.
        task: ``causal_lm`` (SFT, PPO policy) or ``seq_cls`` with one output (reward model).
        device: where quantized weights are placed. Quantized weights cannot be moved after
            loading, so under DDP each rank passes its own device; unquantized models load
            on CPU and the Trainer moves them.
        dropout: False zeroes every dropout probability of the model's config before it is
            built (LoRA dropout stays as configured): for methods that compare two forwards
            (PPO's ratio, a reference pass), which must agree exactly.
        new_head: the task head may be missing from ``name_or_path`` (a reward model started
            from a causal LM gets a new score head); any other missing weight is an error.
    """
    device = torch.device(device or "cpu")
    check_quantization(cfg.quantization, device)
    architecture = cfg.architecture(tokenizer)  # config.json only: checks before any weights
    extra: dict = {"num_labels": 1} if task == "seq_cls" else {}
    if not dropout:
        extra.update({name: 0.0 for name in dropout_fields(architecture)})
    kwargs: dict = {"dtype": cfg.torch_dtype, "attn_implementation": attention_for(cfg, architecture, task)}
    if device.type == "meta":
        return _on_meta(cfg, architecture, extra, kwargs, task, tokenizer, new_head=new_head)

    # Whatever the default device (Lightning runs configure_model under torch.device(<the GPU>),
    # where a 20B random init would be materialised in full before any quantization): quantized
    # weights go straight to `device`, everything else is built on the CPU and the Trainer moves it.
    with contextlib.ExitStack() as stack, torch.device(device if cfg.quantized else "cpu"):
        if cfg.name_or_path is not None:
            source = resolve_path(cfg.name_or_path)
            kwargs.update(revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
        else:
            config = architecture
            for key, value in extra.items():
                setattr(config, key, value)
            with _seeded(cfg.seed), torch.device("cpu"):  # the same init for every device
                model = auto_class(task).from_config(config, **kwargs)
            if not cfg.quantized:
                return _finish(model, cfg, task, tokenizer)
            # bitsandbytes quantizes while loading, so the random init goes through a
            # (temporary) checkpoint like any pretrained model.
            source = stack.enter_context(tempfile.TemporaryDirectory(prefix="lit_rlhf_init_"))
            model.save_pretrained(source)
            del model

        if cfg.quantized:
            kwargs.update(quantization_config=bnb_config(cfg.quantization, compute_dtype or cfg.torch_dtype,
                                                              cfg.double_quant),
                          device_map={"": device})
        model = from_pretrained_checked(auto_class(task), source, new_head=new_head or cfg.arch is not None,
                                        **extra, **kwargs)
        return _finish(model, cfg, task, tokenizer)


def _on_meta(cfg: ModelConfig, config, extra: dict, kwargs: dict, task: Task, tokenizer, *,
             new_head: bool) -> nn.Module:
    """``device="meta"`` of :func:`load_model`: the pretrained weights stay on the meta device, for
    each rank to read its shards into once the model is sharded (:mod:`lit_rlhf.models.shards`);
    buffers, a new task head and LoRA adapters are made on the CPU, as on a loaded model."""
    from accelerate import init_empty_weights

    from lit_rlhf.models.shards import checkpoint_files, init_adapters, missing_weights

    source = resolve_path(cfg.name_or_path) if cfg.name_or_path is not None else None
    entries = checkpoint_files(source) if source is not None else {}
    if not entries:
        raise ValueError(f"model.init_args.lm.name_or_path={cfg.name_or_path!r}: no safetensors files to load "
                         "shards from")
    for key, value in extra.items():
        setattr(config, key, value)
    with init_empty_weights(include_buffers=False):
        model = auto_class(task).from_config(config, trust_remote_code=cfg.trust_remote_code, **kwargs)
    model.tie_weights()  # accelerate's context re-creates every parameter it registers: ties broken there
    prefix = f"{model.base_model_prefix}."
    missing = missing_weights(model, entries)
    if bad := [k for k in missing if not (new_head and not k.startswith(prefix))]:
        raise ValueError(f"{source}: {len(bad)} weight(s) are not in the checkpoint and would be randomly "
                         f"initialised, e.g. {bad[0]}")
    for module in dict.fromkeys(model.get_submodule(name.rpartition(".")[0]) for name in missing):
        module.to_empty(device="cpu", recurse=False)  # a new task head: initialised as from_pretrained does
        model._init_weights(module)
    model = _finish(model, cfg, task, tokenizer)
    init_adapters(model)
    return model


def from_pretrained_checked(auto_class, source: str, *, new_head: bool = False, **kwargs) -> nn.Module:
    """``auto_class.from_pretrained`` that refuses to invent weights, with a one-line error.

    transformers initialises whatever the checkpoint lacks and only logs a warning: a reward
    model's export loaded as a causal LM gets a random LM head, a causal LM loaded as a
    reward scorer a random score head, and training goes on. Here a missing weight is an
    error, except the task head (outside ``base_model_prefix``) when ``new_head`` says a new
    one is expected (a reward model started from a language model).
    """
    try:
        model, info = auto_class.from_pretrained(source, output_loading_info=True, **kwargs)
    except (OSError, ValueError, RuntimeError) as err:
        raise ValueError(f"{source}: cannot load the model's weights: {_first_line(err)}") from err
    except Exception as err:  # safetensors' SafetensorError (a truncated file) has no common base
        if type(err).__name__ != "SafetensorError":
            raise
        raise ValueError(f"{source}: cannot read the weights file (truncated or corrupt?): {_first_line(err)}") from err
    prefix = f"{model.base_model_prefix}."
    missing = [k for k in info.get("missing_keys", []) if not (new_head and not k.startswith(prefix))]
    if missing:
        hint = ("is it a reward model's export? a policy needs a language model" if "CausalLM" in auto_class.__name__
                else "a reward model needs its trained score head; a new one is made only where "
                     "the config says so, e.g. RewardModule's new_score_head")
        raise ValueError(f"{source}: {len(missing)} weight(s) are not in the checkpoint and would be "
                         f"randomly initialised, e.g. {missing[0]} ({hint})")
    return model


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:300] if text else type(err).__name__


def _finish(model: nn.Module, cfg: ModelConfig, task: Task, tokenizer) -> nn.Module:
    if task == "seq_cls" and model.config.pad_token_id is None:
        # The score is read at the last non-pad token, found through pad_token_id.
        model.config.pad_token_id = tokenizer.pad_token_id
    model.config.use_cache = False  # training; generation turns the cache on explicitly
    # from_pretrained returns eval mode and Lightning keeps module modes as it finds them:
    # without this, dropout (and LoRA dropout) would be silently off during training.
    model.train()

    if cfg.quantized:
        # What peft's prepare_model_for_kbit_training does, without its upcast of every
        # unquantized weight (embeddings, norms, LM head) to float32: that upcast makes the
        # residual stream float32 and, since bitsandbytes layers return their input's dtype,
        # the KV cache too (twice the bytes of a bf16 cache, the peak of a 20B rollout).
        disable_cpu_4bit_repacking(model)
        model.requires_grad_(False)  # the quantized base is frozen; adapters come next
    if cfg.gradient_checkpointing:
        # Non-reentrant checkpointing works with frozen inputs (LoRA) and with DDP.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    if cfg.lora is None:
        return model
    from peft import LoraConfig, TaskType, get_peft_model

    lora = LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=lora_targets(cfg.lora.target_modules, model.config.model_type),
        modules_to_save=cfg.lora.modules_to_save,
        task_type=TaskType.CAUSAL_LM if task == "causal_lm" else TaskType.SEQ_CLS,
        # SEQ_CLS marks the score head as `modules_to_save`: trained and saved with the adapter.
    )
    return get_peft_model(model, lora)


def lora_targets(target_modules, model_type: str):
    """``target_modules`` as given, or where it is None and peft has no default list for the
    architecture (Phi-3, OLMo-2, Granite, ...), ``"all-linear"``, with a note on stderr."""
    if target_modules is not None:
        return target_modules
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS

    if model_type in DEFAULTS:
        return None  # peft's default for the architecture
    print(f"[lit_rlhf] lora.target_modules: peft has no default for {model_type!r}; using all-linear",
          file=sys.stderr)
    return "all-linear"


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
