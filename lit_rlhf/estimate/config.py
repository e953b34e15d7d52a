"""Reading a stage's config into the memory formulas (:mod:`lit_rlhf.estimate.memory`), and the
``lit-rlhf estimate`` command; see :mod:`lit_rlhf.estimate`."""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from lit_rlhf.recipes import (
    compose,
    config_chain,
    default_precision,
    find_config,
    is_fsdp2,
    merge_configs,
    nested,
    strategy_problem,
)
from lit_rlhf.estimate import memory as M
from lit_rlhf.models import ModelConfig

Stage = M.Stage
STAGE_CLASSES = (("PPOModule", "ppo"), ("GRPOModule", "grpo"), ("DPOModule", "dpo"), ("RewardModule", "rm"),
                 ("SFTModule", "sft"))
MODEL_REWARDS = ("RewardModelReward", "TextClassificationReward")

USAGE = """usage: lit-rlhf estimate -c CONFIG [-c OVERLAY ...] [--key.path=VALUE ...] [--memory SIZE]

Predicted peak memory per device of the stage a training config describes, from the model's
config.json or arch alone (no weights are read). SIZE: 24GB (10^9 bytes), 24GiB (2^30),
24000MB, 80G (G, M, K alone: binary units)."""


@dataclass
class RewardSpec:
    """The reward role of PPO/GRPO, for :func:`estimate_stage`."""

    kind: Literal["none", "adapter", "model"] = "none"
    """``none``: rule-based, no memory; ``adapter``: a LoRA adapter + score head on the policy's
    base (:class:`~lit_rlhf.rewards.AdapterReward`); ``model``: a reward model of its own."""
    adapter: str | None = None
    """``adapter``: its folder; ``adapter_config.json``'s ``r`` and ``target_modules`` are read
    when present, else ``lora_r`` / ``target_modules`` (default: the policy's)."""
    lora_r: int | None = None
    target_modules: list[str] | str | None = None
    path: str | None = None
    """``model``: a local directory, hub id or registered name with a ``config.json``."""
    arch: dict | None = None
    """``model``: config fields with ``model_type`` instead of ``path``."""
    dtype: str = "float32"
    """``model``: its weights' dtype."""
    quantization: str = "none"
    """``model``: loaded in 8-/4-bit (frozen)."""
    batch_size: int = 16
    """Texts per scoring forward."""
    max_length: int = 1024
    """Longest scored text (tokens)."""
    label: str = ""


# ------------------------------------------------------------------------------ sizes


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_memory(text: str) -> int:
    """``24GB`` -> 24e9 bytes, ``24GiB``/``24G`` -> 24 * 2^30, ``24000MB`` -> 24e9."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS or float(match.group(1)) <= 0:
        raise ValueError(f"--memory {text!r}: expected a size such as 24GB, 24GiB, 24000MB or 80G")
    return int(float(match.group(1)) * _UNITS[unit])


# ------------------------------------------------------------------------------ shapes


def _text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def arch_shape(config, task: str = "causal_lm", trust_remote_code: bool = False) -> M.ArchShape:
    """The :class:`~lit_rlhf.estimate.memory.ArchShape` of a transformers config, exact for any architecture.

    The model is built on PyTorch's meta device (shapes, no storage, no weights read) and its
    modules are read: the linears of the first decoder layer, the embeddings, the LM head (tied
    or not) and the parameter total.
    """
    import torch
    from torch import nn
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from transformers.pytorch_utils import Conv1D

    text = _text_config(config)
    auto = AutoModelForCausalLM
    if task == "seq_cls" and type(config) not in AutoModelForCausalLM._model_mapping:
        auto = AutoModelForSequenceClassification  # e.g. a DistilBERT sentiment classifier
    try:
        with torch.device("meta"):
            model = auto.from_config(config, trust_remote_code=trust_remote_code)
    except (ValueError, KeyError) as err:
        raise ValueError(f"model_type {config.model_type!r}: transformers cannot build it: "
                         f"{_first_line(err)}") from None
    n_layers = text.num_hidden_layers
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) == n_layers]
    if not found:
        raise ValueError(f"model_type {config.model_type!r}: no list of {n_layers} decoder layers found")
    prefix, layers = found[0]
    linears = []
    for name, module in layers[0].named_modules():
        if isinstance(module, nn.Linear):
            linears.append(M.LinearShape(name, module.in_features, module.out_features, module.bias is not None))
        elif isinstance(module, Conv1D):  # GPT-2: weight (in, out)
            linears.append(M.LinearShape(name, module.weight.shape[0], module.nf, module.bias is not None))
    embeddings = {id(m.weight): m.weight.numel() for m in model.modules() if isinstance(m, nn.Embedding)}
    head = model.get_output_embeddings() if auto is AutoModelForCausalLM else None
    tied = head is not None and id(head.weight) in embeddings
    head_params = 0 if head is None or tied else head.weight.numel()
    total = sum(p.numel() for p in model.parameters())
    shape = M.ArchShape(
        model_type=config.model_type, hidden=text.hidden_size, layers=n_layers, heads=text.num_attention_heads,
        kv_heads=getattr(text, "num_key_value_heads", None) or text.num_attention_heads,
        head_dim=getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads,
        intermediate=0, vocab=text.vocab_size, layer_linears=tuple(linears), layer_prefix=prefix,
        embedding_params=sum(embeddings.values()), head_params=head_params)
    mlp_out = [lin for lin in linears if M.linear_role(lin.name) == "mlp_out"]
    intermediate = (mlp_out[0].in_features if mlp_out else
                    getattr(text, "intermediate_size", None) or getattr(text, "n_inner", None) or 4 * text.hidden_size)
    mlp_in = sum(lin.out_features for lin in linears if M.linear_role(lin.name) == "mlp_in")
    other = total - shape.linear_weights - shape.linear_biases - shape.embedding_params - head_params
    return dataclasses.replace(shape, intermediate=intermediate, gated_mlp=mlp_in >= 2 * intermediate,
                               other_params=other)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:300] if text else type(err).__name__


def _arch_has_vocab(arch) -> bool:
    from lit_rlhf.models.sources import registered_arch

    if isinstance(arch, dict):
        return "vocab_size" in arch
    fields = registered_arch(arch)
    if fields is None and Path(arch).is_file():
        fields = json.loads(Path(arch).read_text())
    return bool(fields) and "vocab_size" in fields


@contextlib.contextmanager
def _quiet_hub():
    """huggingface_hub's warnings (one per retry) off for a block."""
    import logging

    logger = logging.getLogger("huggingface_hub")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


# The published config.json shapes of the models the shipped recipes name, so that `estimate`
# answers offline (a model in the local hub cache is read from there instead).
_LLAMA_7B = dict(model_type="llama", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=32, intermediate_size=11008, vocab_size=32000, tie_word_embeddings=False)
KNOWN_SHAPES: dict[str, dict] = {
    "huggyllama/llama-7b": dict(_LLAMA_7B, max_position_embeddings=2048),
    "meta-llama/Llama-2-7b-hf": dict(_LLAMA_7B, max_position_embeddings=4096),
    "mistralai/Mistral-7B-v0.1": dict(_LLAMA_7B, model_type="mistral", num_key_value_heads=8,
                                      intermediate_size=14336, max_position_embeddings=32768, sliding_window=4096),
    "TinyLlama/TinyLlama-1.1B-Chat-v1.0": dict(_LLAMA_7B, hidden_size=2048, num_hidden_layers=22,
                                               num_key_value_heads=4, intermediate_size=5632,
                                               max_position_embeddings=2048),
    "EleutherAI/gpt-neox-20b": dict(model_type="gpt_neox", hidden_size=6144, num_hidden_layers=44,
                                    num_attention_heads=64, intermediate_size=24576, vocab_size=50432,
                                    max_position_embeddings=2048, rotary_pct=0.25, tie_word_embeddings=False),
    "Qwen/Qwen2.5-0.5B-Instruct": dict(model_type="qwen2", hidden_size=896, num_hidden_layers=24,
                                       num_attention_heads=14, num_key_value_heads=2, intermediate_size=4864,
                                       vocab_size=151936, max_position_embeddings=32768, tie_word_embeddings=True),
    "Qwen/Qwen2.5-7B-Instruct": dict(model_type="qwen2", hidden_size=3584, num_hidden_layers=28,
                                     num_attention_heads=28, num_key_value_heads=4, intermediate_size=18944,
                                     vocab_size=152064, max_position_embeddings=32768, tie_word_embeddings=False),
    "lvwerra/distilbert-imdb": dict(model_type="distilbert", dim=768, n_layers=6, n_heads=12, hidden_dim=3072,
                                    vocab_size=30522, max_position_embeddings=512, num_labels=2),
}


def model_architecture(lm: ModelConfig, where: str, notes: list[str]):
    """The ``PretrainedConfig`` of ``lm`` without reading weights (nor building a demo model).

    A registered model that is not built yet (``demo-sft``: training it takes minutes) is
    taken from the shape its package reports (see ``lit_rlhf.models.sources.unbuilt_model``). A
    hub id is read from the hub cache, else from :data:`KNOWN_SHAPES`, else from the hub.
    """
    from transformers import AutoConfig

    from lit_rlhf.models import load_tokenizer, resolve_path
    from lit_rlhf.models.sources import unbuilt_model

    name = lm.name_or_path
    if name is not None:
        if (pending := unbuilt_model(name)) is not None:  # e.g. demo-sft before its first use
            fields, note = pending
            notes.append(f"{where}={name} {note}")
            return model_architecture(ModelConfig(**fields), where, notes)
        path = resolve_path(name)
        if Path(path).expanduser().is_dir() and not (Path(path).expanduser() / "config.json").is_file():
            raise ValueError(f"{where}: {path} has no config.json")
        try:
            return AutoConfig.from_pretrained(path, revision=lm.revision, trust_remote_code=lm.trust_remote_code,
                                              local_files_only=True)
        except (OSError, ValueError) as err:
            if Path(path).expanduser().exists():
                raise ValueError(f"{where}: cannot read {path}/config.json: {_first_line(err)}") from None
        if name in KNOWN_SHAPES:  # not cached: the published shape, no network needed
            notes.append(f"{where}={name}: not in the hub cache; the shape of its published config.json "
                         "(lit_rlhf.estimate.config.KNOWN_SHAPES)")
            fields = dict(KNOWN_SHAPES[name])
            return AutoConfig.for_model(fields.pop("model_type"), **fields)
        try:  # ask the hub for config.json alone (its retry warnings would bury the error line)
            with _quiet_hub():
                return lm.architecture()
        except (OSError, ValueError) as err:
            raise ValueError(f"{where}: cannot read the config.json of {name!r} (not a local directory, not in the "
                             f"hub cache, hub unreachable?): {_first_line(err)}; give its shape as "
                             f"--{where.rpartition('.')[0]}.arch=PATH/config.json (and tokenizer), or download "
                             "config.json once") from None
    tokenizer = None
    if not _arch_has_vocab(lm.arch):
        try:
            tokenizer = load_tokenizer(lm.tokenizer, trust_remote_code=lm.trust_remote_code)
        except (OSError, ValueError) as err:
            notes.append(f"{where.rpartition('.')[0]}.arch: no vocab_size, and the tokenizer {lm.tokenizer!r} is "
                         f"unreadable ({_first_line(err)}): the architecture's default vocabulary size")
    return lm.architecture(tokenizer)


# ------------------------------------------------------------------------------ the stage


# modules_to_save names -> which of the shape's tables they copy (peft trains a copy beside the original).
def _modules_to_save_params(shape: M.ArchShape, names: list[str]) -> int:
    tables = {"embed_tokens": shape.embedding_params, "wte": shape.embedding_params, "embed_in": shape.embedding_params,
              "lm_head": shape.head_params or shape.embedding_params, "embed_out": shape.head_params}
    return sum(tables.get(name, 0) for name in names)


def _peft_default_targets(model_type: str) -> tuple[str, ...] | None:
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS

    targets = DEFAULTS.get(model_type)
    return tuple(targets) if targets else None


def _precision(precision: str) -> tuple[bool, bool]:
    """(autocast, weights cast to 16-bit by Lightning) for a trainer precision."""
    p = str(precision)
    if p in ("bf16-mixed", "16-mixed", "bf16", "16"):
        return True, False
    if p in ("bf16-true", "16-true"):
        return False, True
    if p in ("32-true", "32", "64-true", "64"):
        return False, False
    raise ValueError(f"trainer.precision={p!r}: expected bf16-mixed, 16-mixed, 32-true, bf16-true or 16-true")


def _dtype_bytes(dtype: str, where: str) -> int:
    sizes = {"float32": 4, "bfloat16": 2, "float16": 2}
    if dtype not in sizes:
        raise ValueError(f"{where}: dtype {dtype!r} is none of {', '.join(sizes)}")
    return sizes[dtype]


def _adapter_lora(spec: RewardSpec, lm: ModelConfig) -> tuple[int | None, Any, str]:
    """(r, target_modules, where they come from) of a reward adapter."""
    if spec.adapter is not None:
        config = Path(spec.adapter).expanduser() / "adapter_config.json"
        if config.is_file():
            try:
                data = json.loads(config.read_text())
            except json.JSONDecodeError as err:
                raise ValueError(f"reward adapter {config}: invalid JSON: {err}") from None
            if isinstance(data.get("r"), int):
                return data["r"], data.get("target_modules"), str(config)
    r = spec.lora_r or (lm.lora.r if lm.lora else 16)
    targets = spec.target_modules if spec.target_modules is not None else (lm.lora.target_modules if lm.lora else None)
    return r, targets, "the policy's LoRA settings" if spec.lora_r is None else "lora_r / target_modules"


def _reward_memory(spec: RewardSpec, lm: ModelConfig, policy: M.ModelMemory, notes: list[str]) -> M.RewardMemory:
    if spec.kind == "none":
        return M.RewardMemory("none", label=spec.label)
    if spec.kind == "adapter":
        if lm.lora is None:
            raise ValueError("reward.init_args.adapter: AdapterReward scores on the policy's frozen base, so the "
                             "policy needs LoRA (model.init_args.lm.lora)")
        r, targets, source = _adapter_lora(spec, lm)
        linears = M.lora_target_linears(policy.shape, targets, _peft_default_targets(policy.shape.model_type))
        notes.append(f"reward adapter: r={r}, {len(linears)} linears per layer (from {source})")
        return M.RewardMemory("adapter", lora_params=M.lora_params(policy.shape, linears, int(r)),
                              batch_size=spec.batch_size, max_length=spec.max_length,
                              label=spec.label or spec.adapter or "")
    if spec.kind != "model":
        raise ValueError(f"reward kind {spec.kind!r}: expected none, adapter or model")
    dtype = _dtype_bytes(spec.dtype, "reward.init_args.dtype")
    if spec.quantization not in ("none", "8bit", "4bit-nf4", "4bit-fp4"):
        raise ValueError(f"reward.init_args.quantization={spec.quantization!r}: expected none, 8bit, 4bit-nf4 "
                         "or 4bit-fp4")
    if spec.arch is not None:
        from transformers import AutoConfig

        fields = dict(spec.arch)
        config = AutoConfig.for_model(fields.pop("model_type"), **fields)
        shape = arch_shape(config, "seq_cls")
    else:
        path = spec.path
        if path is None:
            raise ValueError("reward model: give its `path` or `arch`")
        local = Path(path).expanduser()
        try:
            shape = arch_shape(model_architecture(ModelConfig(name_or_path=path), "reward.init_args.path", notes),
                               "seq_cls")
        except (ValueError, FileNotFoundError):
            if local.exists():
                raise
            # Not trained yet (runs/.../export) or not reachable: the usual case is an RM trained
            # from the policy's own base, so that is what is counted.
            shape = policy.shape
            notes.append(f"reward model {path!r}: no config.json readable (not trained yet? offline?): "
                         "counted as the policy's architecture")
    # Its unquantized parts keep the configured dtype, as the policy's do.
    rm = M.ModelMemory(shape, dtype, spec.quantization, task="seq_cls")
    return M.RewardMemory("model", rm, batch_size=spec.batch_size, max_length=spec.max_length,
                          label=spec.label or spec.path or "arch")


def estimate_stage(lm: ModelConfig, stage: Stage, *, batch_size: int, seq_length: int | None = None,
                   prompt_length: int | None = None, new_tokens: int | None = None,
                   mini_batch_size: int | None = None, gradient_accumulation_steps: int = 1,
                   num_generations: int = 1, reward: RewardSpec | list[RewardSpec] | None = None,
                   reference: Literal["model", "none"] = "model", precompute_reference: bool = False,
                   precision: str = "bf16-mixed", accelerator: str = "cuda", devices: int = 1,
                   fsdp2: int = 0, cpu_offload: bool = False, gather_for_sampling: bool = True,
                   optimizer: str = "adamw", shape: M.ArchShape | None = None,
                   mini_batch_tokens: int | None = None, device_memory: int | None = None,
                   notes: list[str] | None = None) -> M.Estimate:
    """The predicted peak memory per device of one step of ``stage`` for the model ``lm``.

    Args:
        lm: the policy / trained model (its shape from ``config.json`` or ``arch``; no weights read).
        stage: ``sft``, ``rm``, ``dpo``, ``ppo`` or ``grpo``.
        batch_size: per device: SFT chunks; RM/DPO pairs; PPO/GRPO prompts per rollout.
        seq_length: SFT chunk length; RM/DPO longest sequence (``max_length``).
        prompt_length, new_tokens: PPO/GRPO prompt tokens and sampled tokens (the maximum).
        mini_batch_size: PPO/GRPO sequences per optimizer step (default: the whole rollout),
            split into ``gradient_accumulation_steps`` micro-batches.
        num_generations: GRPO responses per prompt.
        reward: PPO/GRPO reward role(s): :class:`RewardSpec`; None: rule-based.
        reference: DPO's ``model`` or ``none``; ``precompute_reference`` frees a full copy early.
        precision: the trainer's precision (``bf16-mixed``, ``32-true``, ...).
        accelerator: ``cuda`` (counts the CUDA context) or ``cpu``.
        devices: devices per node; > 1 adds DDP's gradient buckets (unless sharded).
        fsdp2: ranks to shard over (``trainer.strategy=fsdp2``: devices x nodes); 0: not sharded.
            ``cpu_offload`` and ``gather_for_sampling``: the strategy's options.
        shape: the architecture, when already known (skips building it on the meta device).
        mini_batch_tokens: PPO/GRPO tokens per forward; None: the modules' derived default
            (``auto_pass_tokens``) for ``device_memory`` bytes (default: this machine's RAM
            for ``cpu``, 80 GiB for ``cuda``).

    Returns:
        An :class:`~lit_rlhf.estimate.memory.Estimate`: ``.total`` (bytes, CUDA context included),
        ``.allocated`` (comparable to ``torch.cuda.max_memory_allocated()``), ``.rows``.
    """
    notes = [] if notes is None else notes
    if stage not in ("sft", "rm", "dpo", "ppo", "grpo"):
        raise ValueError(f"stage {stage!r}: expected sft, rm, dpo, ppo or grpo")
    task = "seq_cls" if stage == "rm" else "causal_lm"
    config = None
    if shape is None:
        config = model_architecture(lm, "model.init_args.lm.name_or_path", notes)
        shape = arch_shape(config, "causal_lm", lm.trust_remote_code)
    autocast, cast16 = _precision(precision)
    device = "cpu" if accelerator == "cpu" else "cuda"
    dtype = 2 if cast16 else _dtype_bytes(lm.dtype, "model.init_args.lm.dtype")
    policy = M.ModelMemory(shape, dtype, lm.quantization, lm.double_quant, task)
    attention = "sdpa"
    if config is not None:
        from lit_rlhf.models import attention_for

        attention = attention_for(lm, config, task) or "sdpa"
    lora = lm.lora
    targets: tuple[M.LinearShape, ...] = ()
    modules_to_save = 0
    if lora is not None:
        targets = M.lora_target_linears(shape, lora.target_modules, _peft_default_targets(shape.model_type))
        if not targets:
            names = ", ".join(lin.name for lin in shape.layer_linears)
            raise ValueError(f"model.init_args.lm.lora.target_modules={lora.target_modules!r} matches no linear "
                             f"layer of {shape.model_type} (its layers have {names})")
        modules_to_save = _modules_to_save_params(shape, lora.modules_to_save or [])
    dropout = lora.dropout if lora else 0.0
    if stage in ("ppo", "grpo") and dropout:
        dropout = 0.0  # the online modules switch every dropout off (ratio and KL compare two forwards)
        notes.append("LoRA dropout off: the online modules zero every dropout")
    training = M.Training(lora.r if lora else None, targets, dropout, modules_to_save, optimizer,
                          lm.gradient_checkpointing, "eager" if attention == "eager" else "sdpa")

    sharding = dict(ddp=devices > 1 and not fsdp2, fsdp2=fsdp2, cpu_offload=cpu_offload,
                    gather_for_sampling=gather_for_sampling)
    if fsdp2:
        notes.append(f"fsdp2 over {fsdp2} ranks: weights, gradients and optimizer states 1/{fsdp2} per rank"
                     + (" in CPU memory (cpu_offload)" if cpu_offload else "")
                     + ("; the whole policy gathered for sampling" if gather_for_sampling and stage in ("ppo", "grpo")
                        else ""))
    if stage in ("ppo", "grpo"):
        if prompt_length is None or new_tokens is None:
            raise ValueError(f"{stage}: prompt_length and new_tokens are needed")
        prompts, rollout_rows = batch_size, batch_size * num_generations
        mini = mini_batch_size or rollout_rows
        micro = max(1, mini // max(1, gradient_accumulation_steps))
        budget = mini_batch_tokens or _auto_pass_tokens(shape, autocast or cast16, device, device_memory,
                                                        lm.gradient_checkpointing, notes, stage)
        work = M.Workload(stage, micro, prompt_length + new_tokens, new_tokens, prompts, rollout_rows, prompt_length,
                          new_tokens, value_head=stage == "ppo", reference="adapters" if lora else "copy",
                          pass_tokens=budget, **sharding)
        per_forward = work.forward_tokens(micro) // work.seq_length
        notes.append(f"update micro-batch = {stage}.mini_batch_size / gradient_accumulation_steps = {mini} / "
                     f"{gradient_accumulation_steps} = {micro} sequence(s) of {prompt_length} prompt + {new_tokens} "
                     f"new tokens (the longest: every response at max_new_tokens), {per_forward} per forward "
                     f"within {budget} tokens")
    else:
        if seq_length is None:
            raise ValueError(f"{stage}: seq_length is needed")
        sequences = batch_size * (2 if stage in ("rm", "dpo") else 1)
        scored = 0 if stage == "rm" else seq_length
        ref = "none"
        if stage == "dpo" and reference != "none":
            ref = "adapters" if lora else ("precomputed" if precompute_reference else "copy")
        work = M.Workload(stage, sequences, seq_length, scored, reference=ref, **sharding)
        if stage in ("rm", "dpo"):
            notes.append(f"{sequences} sequences per step = 2 x {batch_size} pairs (chosen + rejected), each padded to "
                         f"{seq_length} tokens (an upper bound: most pairs are shorter)")
        if stage == "dpo":
            notes.append("DPO: logits counted at every position (an upper bound: only response tokens are scored)")

    specs = reward if isinstance(reward, list) else [reward or RewardSpec()]
    rewards = tuple(_reward_memory(spec, lm, policy, notes) for spec in specs) if stage in ("ppo", "grpo") else ()
    kwargs = dict(autocast=autocast, device=device)
    est = M.estimate_memory(policy, training, work, rewards, **kwargs)
    switched = dataclasses.replace(training, gradient_checkpointing=not training.gradient_checkpointing)
    flipped = M.estimate_memory(policy, switched, work, rewards, **kwargs)
    other = "on" if not training.gradient_checkpointing else "off"
    if stage == "grpo" and not training.gradient_checkpointing and num_generations > 1:
        notes.append("GRPO runs each group's prompt once when scoring without checkpointing; counted per response "
                     "(an upper bound)")
    notes.append(f"precision {precision}: {'16-bit autocast' if autocast else 'no autocast'}"
                 f"{'; weights cast to 16-bit by Lightning' if cast16 else ''}; attention {attention}")
    if device == "cuda":
        notes.append(f"CUDA context {M.gib(M.CUDA_CONTEXT)} (an assumption; the allocator's cache and fragmentation "
                     "come on top of the prediction)")
    return M.with_assumptions(est, *notes, alternative=(f"gradient checkpointing {other}", flipped.total))


def _auto_pass_tokens(shape: M.ArchShape, sixteen_bit: bool, device: str, memory: int | None,
                      checkpointing: bool, notes: list[str], stage: str) -> int:
    """The online modules' default token budget per forward (``mini_batch_tokens`` unset), for
    ``memory`` bytes of device memory (default: this machine's RAM on CPU, 80 GiB on CUDA)."""
    from types import SimpleNamespace

    import torch

    from lit_rlhf.modules.update import auto_pass_tokens, device_memory

    if memory is None:
        memory = device_memory(torch.device("cpu")) if device == "cpu" else 80 * M.GIB
        where = "this machine's RAM" if device == "cpu" else "an assumed 80 GiB GPU (--memory sets it)"
    else:
        where = "--memory"
    config = SimpleNamespace(hidden_size=shape.hidden, num_hidden_layers=shape.layers,
                             intermediate_size=shape.intermediate)
    budget = auto_pass_tokens(config, 2 if sixteen_bit else 4, memory, checkpointing)
    notes.append(f"{stage}.mini_batch_tokens not set: {budget} tokens per forward, derived from the model's shape and "
                 f"{M.gib(memory)} of {where}")
    return budget


# ------------------------------------------------------------------------------ from a config


def _get(config: dict, dotted: str, default=None):
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node or node[part] is None:
            return default
        node = node[part]
    return node


def _signature_default(class_path: str | None, name: str, fallback):
    """The default of ``name`` in the constructor of ``class_path`` (a datamodule, a reward)."""
    if not class_path:
        return fallback
    import importlib

    module, _, cls = class_path.rpartition(".")
    try:
        parameter = inspect.signature(getattr(importlib.import_module(module), cls)).parameters.get(name)
    except (ImportError, AttributeError, ValueError, TypeError):
        return fallback
    if parameter is None or parameter.default is inspect.Parameter.empty:
        return fallback
    return parameter.default


def _class_name(spec) -> str | None:
    path = spec.get("class_path") if isinstance(spec, dict) else spec if isinstance(spec, str) else None
    return path.rpartition(".")[2] if path else None


def stage_of(class_path: str | None) -> Stage:
    """The stage a module class runs (its class or a subclass of one of lit_rlhf's)."""
    if not class_path:
        raise ValueError("model.class_path is missing: which stage (e.g. lit_rlhf.modules.PPOModule)?")
    import importlib

    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
        from lit_rlhf import modules

        for base, stage in STAGE_CLASSES:
            if isinstance(cls, type) and issubclass(cls, getattr(modules, base)):
                return stage
    except (ImportError, AttributeError, ValueError):
        pass
    for base, stage in STAGE_CLASSES:
        if name == base:
            return stage
    raise ValueError(f"model.class_path={class_path!r}: not a stage the estimator knows "
                     f"({', '.join(b for b, _ in STAGE_CLASSES)})")


def _reward_specs(value, where: str) -> list[RewardSpec]:
    """The :class:`RewardSpec` of a reward (or judge) entry of a config; [] for rule-based ones."""
    if value is None:
        return []
    name = _class_name(value)
    init = (value.get("init_args") or {}) if isinstance(value, dict) else {}
    path = value.get("class_path") if isinstance(value, dict) else value
    def default(key: str, fallback):
        return init.get(key, _signature_default(path, key, fallback))

    if name == "WeightedRewards":
        functions = init.get("functions") or []
        return [s for i, f in enumerate(functions) for s in _reward_specs(f, f"{where}.init_args.functions[{i}]")]
    if name == "AdapterReward":
        if not init.get("adapter"):
            raise ValueError(f"{where}.init_args.adapter is missing (the reward adapter's folder)")
        return [RewardSpec("adapter", adapter=str(init["adapter"]), batch_size=default("batch_size", 16),
                           max_length=default("max_length", 1024), label=f"{where}: {init['adapter']}")]
    if name in MODEL_REWARDS:
        if not init.get("path"):
            raise ValueError(f"{where}.init_args.path is missing (the reward model's directory or hub id)")
        return [RewardSpec("model", path=str(init["path"]), dtype=default("dtype", "float32"),
                           quantization=default("quantization", "none"), batch_size=default("batch_size", 16),
                           max_length=default("max_length", 1024), label=f"{where}: {init['path']}")]
    return []


def estimate_config(config: dict, source: str = "the config", memory: int | None = None) -> M.Estimate:
    """:func:`estimate_stage` for a composed training config (a dict as the YAML files give it);
    ``memory``: the device's memory (``--memory``), which sizes the online passes' default budget."""
    model = config.get("model")
    if not isinstance(model, dict):
        raise ValueError(f"{source}: no `model` section")
    stage = stage_of(model.get("class_path"))
    init = model.get("init_args") or {}
    lm_fields = init.get("lm")
    if not isinstance(lm_fields, dict):
        raise ValueError(f"{source}: model.init_args.lm is missing (the model's config: name_or_path or arch, ...)")
    try:
        lm = ModelConfig(**lm_fields)
    except TypeError as err:
        match = re.search(r"unexpected keyword argument '(\w+)'", str(err))
        field = match.group(1) if match else "?"
        raise ValueError(f"model.init_args.lm: unknown field {field!r}") from None
    data = config.get("data") or {}
    data_path = data.get("class_path") if isinstance(data, dict) else None
    data_init = (data.get("init_args") or {}) if isinstance(data, dict) else {}
    trainer = config.get("trainer") or {}
    accelerator = str(trainer.get("accelerator") or "auto")
    device = "cpu" if accelerator == "cpu" else "cuda"
    precision = trainer.get("precision")
    notes = [f"stage {stage} ({model.get('class_path')}), figures per device"]
    if precision is None:
        # The CLI's rule, for the GPU the estimate is for (unless the config asks for the CPU).
        precision = default_precision(accelerator, bf16_gpu=True)
        notes.append(f"trainer.precision not set: {precision} (lit_rlhf's default on "
                     f"{'CPU' if device == 'cpu' else 'a bf16-capable GPU'})")
    devices = trainer.get("devices", 1)
    devices = len(devices) if isinstance(devices, list) else devices if isinstance(devices, int) else 1
    if (problem := strategy_problem(trainer.get("strategy"), lm.quantization, precision)) is not None:
        raise ValueError(problem)  # what `fit` would say
    strategy = trainer.get("strategy")
    options = (strategy.get("init_args") or {}) if isinstance(strategy, dict) else {}
    nodes = trainer.get("num_nodes", 1) if isinstance(trainer.get("num_nodes", 1), int) else 1
    sharding = dict(fsdp2=devices * nodes, cpu_offload=bool(options.get("cpu_offload", False)),
                    gather_for_sampling=bool(options.get("gather_for_sampling", True))) if is_fsdp2(strategy) else {}

    def data_arg(name: str, fallback):
        value = data_init.get(name)
        if value is None:
            value = _signature_default(data_path, name, fallback)
            notes.append(f"data.init_args.{name} not set: {value} (the datamodule's default)")
        return value

    batch = data_arg("batch_size", 8)
    kwargs: dict = dict(precision=str(precision), accelerator=device, devices=devices,
                        optimizer=_get(init, "optim.optimizer", "adamw"), **sharding)
    if stage == "sft":
        seq = init.get("seq_length") or data_arg("seq_length", 512)
        notes.append(f"batch per device = data.init_args.batch_size = {batch} chunks of {seq} tokens")
        est = estimate_stage(lm, "sft", batch_size=batch, seq_length=seq, notes=notes, **kwargs)
    elif stage in ("rm", "dpo"):
        seq = data_arg("max_length", 512)
        notes.append(f"batch per device = data.init_args.batch_size = {batch} pairs, max_length {seq}")
        est = estimate_stage(lm, stage, batch_size=batch, seq_length=seq, reference=init.get("reference", "model"),
                             precompute_reference=bool(init.get("precompute_reference", False)), notes=notes, **kwargs)
    else:
        from lit_rlhf.modules.grpo import GRPOConfig
        from lit_rlhf.modules.online import SamplingConfig
        from lit_rlhf.modules.ppo import PPOConfig

        sampling = SamplingConfig(**(init.get("sampling") or {}))
        prompt = data_arg("max_prompt_length", 64)
        rewards = _reward_specs(init.get("reward"), "reward") + _reward_specs(init.get("judge"), "judge")
        if stage == "ppo":
            update = PPOConfig(**(init.get("ppo") or {}))
            g, mini, accum = 1, update.mini_batch_size, update.gradient_accumulation_steps
        else:
            update = GRPOConfig(**(init.get("grpo") or {}))
            g, mini, accum = update.num_generations, update.mini_batch_size, update.gradient_accumulation_steps
        notes.append(f"rollout per device = data.init_args.batch_size = {batch} prompts"
                     + (f" x {g} generations" if g > 1 else "")
                     + f", prompts padded to data.init_args.max_prompt_length = {prompt} tokens, "
                       f"sampling.max_new_tokens = {sampling.max_new_tokens}")
        new_tokens = sampling.max_new_tokens
        if init.get("env"):  # multi-turn: a response is the whole trajectory after the prompt
            from lit_rlhf.modules.episodes import EpisodeConfig

            new_tokens = EpisodeConfig(**(init.get("episodes") or {})).max_tokens
            notes.append(f"multi-turn episodes (model.init_args.env): responses of up to episodes.max_tokens = "
                         f"{new_tokens} tokens, the policy's and the observations' (counted as new tokens below)")
        est = estimate_stage(lm, stage, batch_size=batch, prompt_length=prompt, new_tokens=new_tokens,
                             mini_batch_size=mini, gradient_accumulation_steps=accum, num_generations=g,
                             reward=rewards or None, mini_batch_tokens=update.mini_batch_tokens,
                             device_memory=memory, notes=notes, **kwargs)
    name = lm.name_or_path or (lm.arch if isinstance(lm.arch, str) else "arch")
    quant = "" if lm.quantization == "none" else f", {lm.quantization}"
    lora = f", LoRA r={lm.lora.r}" if lm.lora else ", full fine-tuning"
    ckpt = ", gradient checkpointing" if lm.gradient_checkpointing else ""
    return M.with_assumptions(est, title=f"{model.get('class_path')}: {name} ({lm.dtype}{quant}{lora}{ckpt})")


# ------------------------------------------------------------------------------ the command


def compose_args(args: list[str]) -> tuple[dict, int | None, list[str]]:
    """(the composed config, --memory in bytes or None, the config files) of a command line.

    ``-c``/``--config`` files compose by :mod:`lit_rlhf.recipes`' rule (with their
    ``config:`` bases); ``--a.b=value`` / ``--a.b value`` set a key after them (the value read
    as YAML); a class-typed key given a bare class path becomes ``{class_path: ...}``.
    """
    import yaml

    merged: dict = {}
    memory: int | None = None
    files: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        key, eq, value = arg.partition("=")
        if not eq and arg.startswith("-"):
            if i + 1 >= len(args):
                raise ValueError(f"{arg}: needs a value")
            value, i = args[i + 1], i + 1
        i += 1
        if key in ("-c", "--config"):
            if "\n" not in value and (value.endswith((".yaml", ".yml", ".json")) or Path(value).is_file()):
                chain = config_chain(find_config(value))  # where it is named, else a shipped recipe
                files.append(value)
                merged = merge_configs(merged, compose(chain))
            elif ":" not in value:
                raise FileNotFoundError(f"config file not found: {value}")
            else:
                inline = yaml.safe_load(value)
                if not isinstance(inline, dict):
                    raise ValueError(f"--config {value!r}: an inline config must be a mapping")
                merged = merge_configs(merged, inline)
        elif key == "--memory":
            memory = parse_memory(value)
        elif key.startswith("--") and len(key) > 2:
            dotted = key[2:]
            try:
                parsed = yaml.safe_load(value) if value != "" else ""
            except yaml.YAMLError:
                raise ValueError(f"{arg}: the value is not valid YAML") from None
            current = _get(merged, dotted)
            if isinstance(current, dict) and "class_path" in current and isinstance(parsed, str):
                parsed = {"class_path": parsed}
            merged = merge_configs(merged, nested(dotted, parsed)) if parsed is not None else _set_none(merged, dotted)
        else:
            raise ValueError(f"unexpected argument {arg!r} (see lit-rlhf estimate --help)")
    if not files and not merged:
        raise ValueError("no config given: lit-rlhf estimate -c CONFIG [-c OVERLAY ...]")
    return merged, memory, files


def _set_none(config: dict, dotted: str) -> dict:
    """``config`` with the key at ``dotted`` set to None (``--a.b=null``)."""
    out = dict(config)
    node = out
    parts = dotted.split(".")
    for part in parts[:-1]:
        child = dict(node.get(part) or {}) if isinstance(node.get(part), dict) else {}
        node[part] = child
        node = child
    node[parts[-1]] = None
    return out


def render(est: M.Estimate, memory: int | None = None, memory_text: str | None = None) -> str:
    """The table of an estimate, the assumptions, and the fits line last."""
    width = max(len(row.component) for row in est.rows) + 2
    lines = [f"Predicted peak memory per device: {est.title}" if est.title else "Predicted peak memory per device", ""]
    lines.append(f"  {'component':<{width}}{'phase':<10}{'size':>12}")
    order = ["always", "update", "generate", "score", "reward", "reference"]
    for row in sorted(est.rows, key=lambda r: order.index(r.phase) if r.phase in order else len(order)):
        note = f"   ({row.note})" if row.note else ""
        lines.append(f"  {row.component:<{width}}{row.phase:<10}{M.gib(row.bytes):>12}{note}")
    lines.append("")
    peak = est.peak_phase
    parts = f"always {M.gib(est.always)}"
    if peak:
        parts += f" + {peak} {M.gib(est.phase_bytes(peak))} (the largest phase)"
    lines.append(f"  total (peak): {M.gib(est.total)} = {parts}")
    lines.append(f"  of which tensors (as torch.cuda.max_memory_allocated counts): {M.gib(est.allocated)}")
    if est.alternative:
        lines.append(f"  with {est.alternative[0]}: {M.gib(est.alternative[1])}")
    lines.append("")
    lines.append("assumptions:")
    lines += [f"  - {note}" for note in est.assumptions]
    if memory is not None:
        spare = memory - est.total
        given = f"{memory_text} = {M.gib(memory)}" if memory_text else M.gib(memory)
        verdict = (f"yes, {M.gib(spare)} to spare" if spare >= 0 else f"no, {M.gib(-spare)} over")
        lines.append(f"fits in {given}: {verdict}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """``lit-rlhf estimate ...`` (dispatched by :func:`lit_rlhf.cli.main`)."""
    args = sys.argv[1:] if argv is None else list(argv)
    if any(a in ("-h", "--help") for a in args):
        print(USAGE)
        return
    try:
        config, memory, files = compose_args(args)
        memory_text = next((a.partition("=")[2] or args[k + 1] for k, a in enumerate(args)
                            if a.partition("=")[0] == "--memory"), None)
        est = estimate_config(config, " + ".join(files) or "the config", memory)
    except (ValueError, OSError, TypeError, KeyError) as err:
        if os.environ.get("LIT_RLHF_DEBUG"):
            raise
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if isinstance(err, KeyError):
            message = f"missing key {err}"
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
    if files:
        est = M.with_assumptions(est, title=f"{est.title}\n  from {' + '.join(files)}")
    print(render(est, memory, memory_text))


if __name__ == "__main__":
    main()
