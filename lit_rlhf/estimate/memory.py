"""Predicted peak memory of one training stage on one device, from shapes alone: pure arithmetic.

Dataclasses in, bytes (ints) out; no torch, no files. :mod:`lit_rlhf.estimate` reads a config into
these dataclasses and prints the table (``lit-rlhf estimate``); a benchmark calls
``lit_rlhf.estimate.estimate_stage`` (or :func:`estimate_memory` here) to put the prediction
beside a measured peak.

Symbols: ``h`` hidden size, ``L`` layers, ``a`` attention heads, ``d`` head dim, ``h_a = a*d``,
``kv = kv_heads*d``, ``i`` MLP width, ``V`` vocabulary, ``T`` sequence length, ``r`` LoRA rank.
"Per token" means per position of every sequence in the batch.

The dtype rules below are those of lit_rlhf's own load path, found by counting the bytes that
autograd saves (saved-tensor hooks) and the KV cache that generation keeps, on tiny Llamas on
CPU (torch 2.13, transformers 5.24, peft 0.21, bitsandbytes 0.50); tests/test_estimate.py keeps
the exact ones checked. The main rule: the parameters that bitsandbytes does not quantize
(embeddings, LM head, norms, biases) stay in the configured dtype (lit_rlhf's k-bit preparation
does not upcast them as peft's does), so the residual stream and, since bitsandbytes layers
return their input's dtype, the KV cache are in that dtype (bf16 in the GPU recipes).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from typing import Literal

Stage = Literal["sft", "rm", "dpo", "ppo", "grpo"]
Phase = Literal["always", "update", "generate", "score", "reward", "reference"]

KIB, MIB, GIB = 2**10, 2**20, 2**30
CUDA_CONTEXT = 512 * MIB
"""Assumed CUDA context + kernels per process (not in ``torch.cuda.max_memory_allocated``); it
varies with the driver, the GPU and the libraries loaded (measure: nvidia-smi after
``torch.cuda.init()``)."""

# Blocks of bitsandbytes' 4-bit format: one absmax per 64 weights; with double quantization the
# absmax values are themselves 8-bit, in blocks of 256 with one float32 absmax each.
NF4_BLOCK, NF4_BLOCK2 = 64, 256
# SFT's chunked cross-entropy upcasts at most this many logits to float32 at a time
# (lit_rlhf.objectives.lm._CHUNK_ELEMENTS).
CE_CHUNK_ELEMENTS = 1 << 22
# The online passes' log-probs run the LM head on this many logits at a time
# (lit_rlhf.objectives.logprobs.CHUNK_ELEMENTS; a test keeps the two equal).
LOGPROB_CHUNK_ELEMENTS = 1 << 24
# What a CPU process holds before any tensor: Python, torch, transformers, lightning, tokenizers
# (measured 2026-12-07: the memory-real-smoke fit, whose tensors are a few MB, peaked at 532 MB).
CPU_PROCESS = 512 * MIB


# ------------------------------------------------------------------------------ shapes


@dataclass(frozen=True)
class LinearShape:
    """One linear layer (``nn.Linear`` or GPT-2's ``Conv1D``) of a decoder layer."""

    name: str
    """Its path inside the decoder layer, e.g. ``self_attn.q_proj``."""
    in_features: int
    out_features: int
    bias: bool = False

    @property
    def weights(self) -> int:
        return self.in_features * self.out_features


@dataclass(frozen=True)
class ArchShape:
    """What memory depends on in a decoder-only transformer (read from its ``config.json``).

    The decoder layers are assumed identical (true of Llama, Mistral, Qwen, GPT-NeoX, GPT-2,
    OPT, ...): ``layer_linears`` are the linears of one of them.
    """

    model_type: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    layer_linears: tuple[LinearShape, ...]
    """The linears of one decoder layer (quantized by bitsandbytes, adapted by LoRA)."""
    layer_prefix: str = "model.layers"
    """Layer ``j``'s linear ``n`` is the module ``f"{layer_prefix}.{j}.{n}"`` (LoRA target matching)."""
    embedding_params: int = 0
    """Input embedding tables (with learned position embeddings): never quantized."""
    head_params: int = 0
    """The LM head's weight, 0 when tied to the input embeddings: never quantized."""
    other_params: int = 0
    """Everything else (norms, ...), biases of ``layer_linears`` excluded: never quantized."""
    gated_mlp: bool = True
    """SwiGLU-style MLP (gate, up, down) rather than two linears around an activation."""

    @property
    def linear_weights(self) -> int:
        """Weights of all decoder-layer linears (what 8-/4-bit quantization applies to)."""
        return self.layers * sum(lin.weights for lin in self.layer_linears)

    @property
    def linear_biases(self) -> int:
        return self.layers * sum(lin.out_features for lin in self.layer_linears if lin.bias)

    @property
    def params(self) -> int:
        return self.linear_weights + self.linear_biases + self.embedding_params + self.head_params + self.other_params

    @property
    def attention_width(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.head_dim


def llama_shape(hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int, vocab: int = 32000,
                tie_word_embeddings: bool = False, head_dim: int | None = None) -> ArchShape:
    """The shape of a Llama (also Mistral, Qwen2 without biases): q/k/v/o, gate/up/down, RMSNorms."""
    d = head_dim or hidden // heads
    linears = (
        LinearShape("self_attn.q_proj", hidden, heads * d), LinearShape("self_attn.k_proj", hidden, kv_heads * d),
        LinearShape("self_attn.v_proj", hidden, kv_heads * d), LinearShape("self_attn.o_proj", heads * d, hidden),
        LinearShape("mlp.gate_proj", hidden, intermediate), LinearShape("mlp.up_proj", hidden, intermediate),
        LinearShape("mlp.down_proj", intermediate, hidden),
    )
    return ArchShape("llama", hidden, layers, heads, kv_heads, d, intermediate, vocab, linears,
                     embedding_params=vocab * hidden, head_params=0 if tie_word_embeddings else vocab * hidden,
                     other_params=(2 * layers + 1) * hidden)


# Last names of the linears that read the attention output or the MLP's inner activation.
_OUTPUT_LINEARS = {"o_proj", "out_proj", "dense", "c_proj", "wo", "down_proj", "dense_4h_to_h", "fc2", "w2", "fc_out"}

LinearRole = Literal["attn_in", "attn_out", "mlp_in", "mlp_out"]


def linear_role(name: str) -> LinearRole:
    """Which activation a decoder-layer linear reads, from its path (``self_attn.q_proj`` -> ``attn_in``).

    Linears of one role read the same tensor: the normed stream (``attn_in``, ``mlp_in``), the
    attention output (``attn_out``) or the MLP's inner activation (``mlp_out``).
    """
    parent, _, last = name.rpartition(".")
    attention = "attn" in parent or "attention" in parent
    if last in _OUTPUT_LINEARS:
        return "attn_out" if attention else "mlp_out"
    return "attn_in" if attention else "mlp_in"


# ------------------------------------------------------------------------------ dtypes


@dataclass(frozen=True)
class Numerics:
    """Bytes per value of each kind of tensor, given the weights' dtype, quantization and autocast."""

    weight: int
    """Parameters that are not quantized (embeddings, LM head, norms)."""
    stream: int
    """The residual stream and the norms' outputs (the dtype of the embedding and norm weights)."""
    compute: int
    """Matmul and attention outputs, logits: 2 under 16-bit autocast, else the stream's."""
    mlp: int
    """The MLP's inner activations (4-bit layers return their input's dtype: the stream's)."""
    key: int
    """KV cache keys (RoPE multiplies them by cos/sin in the stream's dtype)."""
    value: int
    """KV cache values."""
    autocast: bool
    """Mixed precision (``bf16-mixed``, ``16-mixed``): matmuls in 16-bit, weights as stored."""
    adapter: int = 4
    """LoRA adapters, value head, score head: float32 (peft casts adapters up), 2 under ``bf16-true``."""
    mask: int = 1
    """A dropout mask element: a bool on CUDA's fused kernel, the input's dtype on CPU."""


def numerics(dtype_bytes: int, quantization: str = "none", autocast: bool = True, device: str = "cuda") -> Numerics:
    """The dtype rules of lit_rlhf's load path (see the module docstring).

    Args:
        dtype_bytes: the configured weights' dtype (``ModelConfig.dtype``): 4 or 2.
        quantization: ``none``, ``8bit``, ``4bit-nf4``, ``4bit-fp4``.
        autocast: the trainer's precision is ``*-mixed``.
        device: ``cuda`` or ``cpu`` (dropout masks).
    """
    quantized = quantization != "none"
    stream = dtype_bytes
    compute = 2 if autocast else stream
    mlp = stream if is_4bit(quantization) else compute
    return Numerics(weight=dtype_bytes, stream=stream, compute=compute, mlp=mlp, key=max(stream, compute),
                    # bitsandbytes layers return their input's dtype: values in the stream's dtype.
                    # On the CPU, transformers 5.19 (the pinned version) keeps a float32 model's values
                    # in float32 under autocast too (measured: tests/test_estimate.py); GPU: unmeasured.
                    value=stream if quantized else max(stream, compute) if device == "cpu" else compute,
                    autocast=autocast,
                    mask=1 if device == "cuda" else 4)


def is_4bit(quantization: str) -> bool:
    return quantization.startswith("4bit") or quantization in ("nf4", "fp4")


# ------------------------------------------------------------------------------ weights


def quantized_weight_bytes(in_features: int, out_features: int, quantization: str, double_quant: bool = True) -> int:
    """Storage of one linear layer's weight matrix (its bias aside) in 8- or 4-bit, bytes.

    With ``n = in_features * out_features``:

    * ``8bit`` (LLM.int8, ``Int8Params``): ``n`` int8 values + one float32 scale per output row
      (``SCB``): ``n + 4 * out_features``. Outlier columns are split out at matmul time, not
      stored, so they cost only a transient.
    * ``4bit-*`` (``Params4bit``, blocks of 64): ``ceil(n / 2)`` packed bytes, one absmax per
      block and the 16-entry float32 code table (64 B):

      - without double quantization: ``ceil(n/2) + 4 * ceil(n/64) + 64`` (~0.5625 B/param);
      - with it (the absmax values in uint8, minus a float32 offset, in blocks of 256 with a
        float32 absmax each and their own 256-entry float32 code):
        ``ceil(n/2) + ceil(n/64) + 4 + 64 + 4 * ceil(ceil(n/64) / 256) + 1024`` (~0.5159 B/param).
    """
    n = in_features * out_features
    if quantization == "8bit":
        return n + 4 * out_features
    if not is_4bit(quantization):
        raise ValueError(f"quantization {quantization!r}: expected 8bit, 4bit-nf4 or 4bit-fp4")
    blocks = math.ceil(n / NF4_BLOCK)
    packed, code = math.ceil(n / 2), 16 * 4
    if not double_quant:
        return packed + 4 * blocks + code
    return packed + blocks + 4 + code + 4 * math.ceil(blocks / NF4_BLOCK2) + NF4_BLOCK2 * 4


@dataclass(frozen=True)
class WeightBytes:
    linears: int
    """The decoder-layer linears' weight matrices (quantized when the base is)."""
    others: int
    """Embeddings, LM head (or score head), norms and biases: never quantized."""
    other_params: int
    """How many parameters ``others`` holds."""

    @property
    def total(self) -> int:
        return self.linears + self.others


def weight_bytes(shape: ArchShape, num: Numerics, quantization: str = "none", double_quant: bool = True,
                 dtype_bytes: int | None = None, task: Literal["causal_lm", "seq_cls"] = "causal_lm") -> WeightBytes:
    """Bytes of a model's weights: quantized linears + everything else in ``num.weight`` bytes.

    Not quantized: ``params * dtype_bytes``. Quantized: each decoder-layer linear by
    :func:`quantized_weight_bytes`, plus ``num.weight * (embeddings + LM head + norms + biases)``
    (kept in the configured dtype). A reward model (``seq_cls``) has
    a score head of ``h`` weights instead of the LM head.
    """
    dtype_bytes = num.weight if dtype_bytes is None else dtype_bytes
    head = shape.hidden if task == "seq_cls" else shape.head_params
    others = shape.embedding_params + head + shape.other_params + shape.linear_biases
    if quantization == "none":
        return WeightBytes(shape.linear_weights * dtype_bytes, others * dtype_bytes, others)
    per_layer = sum(quantized_weight_bytes(lin.in_features, lin.out_features, quantization, double_quant)
                    for lin in shape.layer_linears)
    return WeightBytes(shape.layers * per_layer, others * num.weight, others)


# ------------------------------------------------------------------------------ trainable parameters


def lora_target_linears(shape: ArchShape, target_modules: list[str] | tuple[str, ...] | str | None,
                        default: tuple[str, ...] | None = None) -> tuple[LinearShape, ...]:
    """The decoder-layer linears that get adapters, by peft's matching rules.

    * a list of names: a module matches a name equal to its full path or to a trailing part
      of it after a dot (``q_proj`` matches ``model.layers.0.self_attn.q_proj``);
    * ``"all-linear"``: every linear but the output layer;
    * another string: a regular expression that must match the whole module path;
    * None: ``default`` (peft's list for the model type, e.g. ``q_proj, v_proj`` for Llama),
      or ``all-linear`` where peft has none (as :func:`lit_rlhf.models.loading.lora_targets` does).

    Matched on layer 0's paths; layers are assumed identical.
    """
    if target_modules is None:
        target_modules = list(default) if default else "all-linear"
    if target_modules == "all-linear":
        return shape.layer_linears
    prefix = f"{shape.layer_prefix}.0."
    if isinstance(target_modules, str):
        pattern = re.compile(target_modules)
        return tuple(lin for lin in shape.layer_linears if pattern.fullmatch(prefix + lin.name))
    names = set(target_modules)
    return tuple(lin for lin in shape.layer_linears
                 if any((prefix + lin.name) == t or (prefix + lin.name).endswith("." + t) for t in names))


def lora_params(shape: ArchShape, targets: tuple[LinearShape, ...], r: int) -> int:
    """LoRA parameters: ``A`` (r x in) and ``B`` (out x r) per adapted linear, in every layer:
    ``L * sum(r * (in + out))``."""
    return shape.layers * sum(r * (lin.in_features + lin.out_features) for lin in targets)


def optimizer_state_bytes(params: int, param_bytes: int, optimizer: str = "adamw") -> int:
    """AdamW's two moments. torch keeps them in each parameter's dtype: ``2 * params * param_bytes``
    (LoRA: 8 B/param; full bf16 fine-tuning: 4 B/param). ``adamw8bit`` (bitsandbytes) keeps
    them in uint8 with a float32 absmax per 2048 values: ``2 * params * (1 + 4/2048)``
    (tensors under 4096 values stay 32-bit; not counted)."""
    if optimizer == "adamw8bit":
        return 2 * params + 2 * 4 * math.ceil(params / 2048)
    return 2 * params * param_bytes


# ------------------------------------------------------------------------------ activations


def layer_activation_bytes(shape: ArchShape, num: Numerics, *, full: bool, lora_targets: tuple[LinearShape, ...] = (),
                           lora_r: int = 0, lora_dropout: float = 0.0, attention: str = "sdpa",
                           seq_length: int = 0) -> int:
    """Bytes autograd keeps for the backward, per token, in one decoder layer (no checkpointing).

    With ``s``, ``c``, ``m`` the stream, compute and MLP bytes of :class:`Numerics`:

    * two norms: the float32 copy of their input (RMSNorm computes in float32) and the
      1/rms per token: ``2 * (4h + 4)``; when the norm weights train (full fine-tuning) also
      their normalized input: ``+ 2 * s * h``;
    * attention (SDPA, flash or memory-efficient: no ``T^2`` term): q, k, v after RoPE and the
      output, plus a float32 logsumexp per head: ``c * (2 h_a + 2 kv) + 4a``. Eager attention
      instead keeps k, v repeated to all heads and the float32 softmax probabilities with
      their 16-bit cast: ``c * 4 h_a + (4 + c) * a * T`` (``4 * a * T`` in float32);
    * MLP: the activation's input, and with a gated MLP its output and the up projection:
      ``3 m i`` (gated) or ``m i``;
    * the inputs of trainable linears, per role (:func:`linear_role`; linears of a role share
      one input): full fine-tuning keeps each role's input once (``s h``, ``m i``; the
      attention output is already kept by SDPA), or, under autocast from a float32 input, one
      16-bit cast per linear (``2 * in``). A LoRA-adapted linear keeps its own 16-bit cast of
      the input (peft casts it to the adapter's float32, autocast back) and A's output:
      ``c * (in + r)`` each (no autocast, float32: the shared input, ``r * 4``); LoRA dropout
      adds its mask, ``mask * in``.

    For a Llama in bf16, full fine-tuning, that is ``20h + 4kv + 8i + 4a + 8`` bytes (182 KiB per
    token per layer for Llama-7B); the classic GPT estimate (Korthikanti et al. 2022: ``34h + 5aT`` bytes in 16-bit)
    counts the same things for a 4h GELU MLP with dropout masks and eager attention.
    """
    h, i, a = shape.hidden, shape.intermediate, shape.heads
    ha, kv = shape.attention_width, shape.kv_width
    s, c, m = num.stream, num.compute, num.mlp
    total = 2 * (4 * h + 4)
    if full:
        total += 2 * s * h
    if attention == "eager":
        probs = 4 + (c if c != 4 else 0)  # the float32 softmax, and its cast unless that is a no-op
        total += c * 4 * ha + probs * a * seq_length
    else:
        total += c * (2 * ha + 2 * kv) + 4 * a
    total += (3 if shape.gated_mlp else 1) * m * i
    # The tensor each role's linears read, and its dtype.
    role_width = {"attn_in": h, "attn_out": ha, "mlp_in": h, "mlp_out": i}
    role_dtype = {"attn_in": s, "attn_out": c, "mlp_in": s, "mlp_out": m}
    trained = shape.layer_linears if full else lora_targets
    for role in ("attn_in", "attn_out", "mlp_in", "mlp_out"):
        linears = [lin for lin in trained if linear_role(lin.name) == role]
        if not linears:
            continue
        # Kept for the backward without a copy? (attn_out's tensor is SDPA's output, kept anyway)
        shared_cost = 0 if role == "attn_out" else role_dtype[role] * role_width[role]
        if full:
            total += shared_cost if role_dtype[role] == c else sum(c * lin.in_features for lin in linears)
        else:
            lora_dtype = c if num.autocast else num.adapter
            if not num.autocast and role_dtype[role] == num.adapter:
                total += shared_cost
            else:
                total += sum(lora_dtype * lin.in_features for lin in linears)
            total += sum(lora_dtype * lora_r for _ in linears)
            if lora_dropout > 0:
                total += sum(num.mask * lin.in_features for lin in linears)
    return total


def activation_bytes(shape: ArchShape, num: Numerics, tokens: int, *, checkpointing: bool, full: bool,
                     lora_targets: tuple[LinearShape, ...] = (), lora_r: int = 0, lora_dropout: float = 0.0,
                     attention: str = "sdpa", seq_length: int = 0) -> int:
    """Activations kept for the backward of one micro-batch of ``tokens`` tokens, bytes.

    * without checkpointing: ``tokens * (L * A + F)`` with ``A`` = :func:`layer_activation_bytes`
      and ``F = 4h + 4`` the final norm (``+ s*h`` when it trains);
    * with (non-reentrant) gradient checkpointing: each layer keeps only its input,
      ``s * h`` per token, and the backward recomputes one layer at a time:
      ``tokens * (L * s * h + A + F)``.
    """
    per_layer = layer_activation_bytes(shape, num, full=full, lora_targets=lora_targets, lora_r=lora_r,
                                       lora_dropout=lora_dropout, attention=attention, seq_length=seq_length)
    final = 4 * shape.hidden + 4 + (num.stream * shape.hidden if full else 0)
    if checkpointing:
        return tokens * (shape.layers * num.stream * shape.hidden + per_layer + final)
    return tokens * (shape.layers * per_layer + final)


def inference_layer_bytes(shape: ArchShape, num: Numerics, tokens: int) -> int:
    """The largest transient of one layer's forward without autograd (sampling, scoring), bytes:
    the MLP's live inner activations (gate, up and their product: ``3 m i``; ``2 m i`` ungated)
    or attention's q, k, v and output (``c * (2 h_a + 2 kv)``), beside the residual and its norm
    (``2 s h``): ``tokens * (max(MLP, attention) + 2 s h)``."""
    mlp = (3 if shape.gated_mlp else 2) * num.mlp * shape.intermediate
    attn = num.compute * (2 * shape.attention_width + 2 * shape.kv_width)
    return tokens * (max(mlp, attn) + 2 * num.stream * shape.hidden)


def lm_loss_logits_bytes(tokens: int, vocab: int, logit_bytes: int) -> int:
    """SFT's logits: the chunked cross-entropy keeps the logits for the backward and writes their
    gradient in the same dtype, with one float32 chunk of 2^22 values (16 MiB) at a time:
    ``tokens * V * 2c + min(tokens * V, 2^22) * 4``."""
    return tokens * vocab * 2 * logit_bytes + min(tokens * vocab, CE_CHUNK_ELEMENTS) * 4


def sampled_logprob_bytes(tokens: int, vocab: int, logit_bytes: int) -> int:
    """Logits of the scored positions when log-probs of given tokens train (PPO, GRPO).

    The LM head runs on at most ``LOGPROB_CHUNK_ELEMENTS // V`` tokens at a time
    (``lit_rlhf.objectives.head_logprobs``). When every token fits in one chunk its float32
    log-softmax is kept for the backward (4 B per logit) beside the logits or their gradient
    (``c``): ``tokens * V * (4 + c)``. Otherwise each chunk is recomputed in the backward, where
    its logits, log-softmax, and their gradients live at once: ``chunk * V * (2c + 8)``.
    """
    rows = max(1, LOGPROB_CHUNK_ELEMENTS // max(1, vocab))
    if tokens <= rows:
        return tokens * vocab * (4 + logit_bytes)
    return rows * vocab * (2 * logit_bytes + 8)


def scoring_logprob_bytes(tokens: int, vocab: int, logit_bytes: int) -> int:
    """A no-grad pass's logits: one chunk's logits and its float32 log-softmax (and the
    entropy's temporary): ``min(tokens, chunk) * V * (c + 8)``."""
    return min(tokens, max(1, LOGPROB_CHUNK_ELEMENTS // max(1, vocab))) * vocab * (logit_bytes + 8)


def kv_cache_bytes(shape: ArchShape, rows: int, tokens: int, key_bytes: int, value_bytes: int) -> int:
    """The KV cache of generation: keys and values of every layer for ``rows`` sequences of
    ``tokens`` positions (prompt + new tokens): ``L * kv_heads * d * rows * tokens * (k + v)``,
    i.e. ``2 * L * kv_heads * d * rows * tokens * bytes`` when keys and values share a dtype."""
    return shape.layers * shape.kv_heads * shape.head_dim * rows * tokens * (key_bytes + value_bytes)


def sampling_bytes(rows: int, vocab: int, logit_bytes: int = 4) -> int:
    """One sampling step's vocabulary-wide temporaries: the head's logits (``c``), their float32
    copy and the float32 probabilities (``lit_rlhf.modules.rollout.sampling_probs``; the draw
    itself adds only (rows x V / 1024) block sums): ``rows * V * (c + 8)``."""
    return rows * vocab * (logit_bytes + 8)


# ------------------------------------------------------------------------------ one stage


@dataclass(frozen=True)
class ModelMemory:
    """One model held on the device: a policy, or a reward model of its own."""

    shape: ArchShape
    dtype_bytes: int
    """The configured weights' dtype: 4 (float32) or 2 (bfloat16, float16)."""
    quantization: str = "none"
    double_quant: bool = True
    task: Literal["causal_lm", "seq_cls"] = "causal_lm"


@dataclass(frozen=True)
class Training:
    """What trains, and how."""

    lora_r: int | None = None
    """LoRA rank; None: full fine-tuning."""
    lora_targets: tuple[LinearShape, ...] = ()
    """The adapted linears of each decoder layer (see :func:`lora_target_linears`)."""
    lora_dropout: float = 0.0
    modules_to_save_params: int = 0
    """Parameters of LoRA's ``modules_to_save``: trained copies beside the frozen originals."""
    optimizer: str = "adamw"
    gradient_checkpointing: bool = False
    attention: str = "sdpa"
    """``sdpa`` / ``flash_attention_2`` (no T^2 activations) or ``eager``."""

    @property
    def full(self) -> bool:
        return self.lora_r is None


@dataclass(frozen=True)
class Workload:
    """The batch shapes of one training step, per device."""

    stage: Stage
    micro_batch: int
    """Sequences per forward/backward: SFT batch; RM/DPO 2 x pairs; PPO/GRPO minibatch / accumulation."""
    seq_length: int
    """Tokens per sequence of the update (PPO/GRPO: prompt + new tokens)."""
    scored_tokens: int = 0
    """Positions per sequence whose vocabulary logits are taken (SFT, DPO: all; PPO/GRPO: new tokens)."""
    prompts: int = 0
    """PPO/GRPO: prompts per rollout (prefilled once)."""
    rollout_rows: int = 0
    """PPO/GRPO: responses per rollout (prompts x generations)."""
    prompt_length: int = 0
    """PPO/GRPO: tokens per (padded) prompt."""
    new_tokens: int = 0
    """PPO/GRPO: sampled tokens per response (the longest: every response at the limit)."""
    value_head: bool = False
    """PPO: a value head beside the LM head."""
    reference: Literal["none", "adapters", "copy", "precomputed"] = "none"
    """``adapters``: the base with adapters off (free); ``copy``: a frozen copy of the model;
    ``precomputed`` (DPO): a copy that lives only while the reference log-probs are computed."""
    ddp: bool = False
    """Several devices with DDP: gradient buckets as large as the trainable gradients."""
    fsdp2: int = 0
    """The number of ranks fsdp2 shards weights, gradients and optimizer states over; 0: not sharded."""
    gather_for_sampling: bool = True
    """fsdp2: the whole policy is gathered for sampling (the strategy's option)."""
    cpu_offload: bool = False
    """fsdp2: the shards live in CPU memory (the strategy's option)."""
    pass_tokens: int | None = None
    """PPO/GRPO: at most this many tokens per forward (``mini_batch_tokens`` or its derived
    default); None: no budget."""

    def forward_tokens(self, sequences: int) -> int:
        """Tokens in one forward over ``sequences`` sequences of ``seq_length``: cut to the pass
        budget (a whole sequence at least)."""
        tokens = sequences * self.seq_length
        if self.pass_tokens is None:
            return tokens
        return min(tokens, max(self.seq_length, self.pass_tokens // self.seq_length * self.seq_length))


@dataclass(frozen=True)
class RewardMemory:
    """The reward role of PPO/GRPO."""

    kind: Literal["none", "adapter", "model"] = "none"
    """``none``: rule-based (no memory); ``adapter``: a LoRA adapter + score head on the policy's
    base; ``model``: a reward model of its own."""
    model: ModelMemory | None = None
    lora_params: int = 0
    """``adapter``: its LoRA parameters (frozen, float32)."""
    batch_size: int = 16
    """Texts per scoring forward."""
    max_length: int = 1024
    label: str = ""


@dataclass(frozen=True)
class Row:
    component: str
    bytes: int
    phase: Phase
    """``always``: held through the whole step; other phases follow one another, and the peak
    is ``always`` + the largest phase."""
    note: str = ""
    sharded: bool = False
    """Split over the ranks under fsdp2 (weights, trainable parameters, gradients, optimizer states)."""


@dataclass(frozen=True)
class Estimate:
    """A predicted peak: rows by phase, the assumptions behind them."""

    rows: tuple[Row, ...]
    assumptions: tuple[str, ...] = ()
    title: str = ""
    alternative: tuple[str, int] | None = None
    """(what differs, its total): e.g. the total with gradient checkpointing switched."""

    def phase_bytes(self, phase: str) -> int:
        return sum(row.bytes for row in self.rows if row.phase == phase)

    @property
    def phases(self) -> list[str]:
        return [p for p in dict.fromkeys(row.phase for row in self.rows) if p != "always"]

    @property
    def peak_phase(self) -> str | None:
        return max(self.phases, key=self.phase_bytes, default=None)

    @property
    def always(self) -> int:
        return self.phase_bytes("always")

    @property
    def total(self) -> int:
        """Predicted peak device memory: ``always + max(phases)``, CUDA context included."""
        peak = self.peak_phase
        return self.always + (self.phase_bytes(peak) if peak else 0)

    @property
    def allocated(self) -> int:
        """The peak of tensors alone, comparable to ``torch.cuda.max_memory_allocated()``
        (the total without the CUDA context; the allocator's caching comes on top of it)."""
        return self.total - sum(row.bytes for row in self.rows if row.component.startswith("CUDA context"))

    def row(self, prefix: str) -> Row:
        """The first row whose component starts with ``prefix``."""
        return next(row for row in self.rows if row.component.startswith(prefix))


def gib(n: int) -> str:
    """``n`` bytes in the largest binary unit that keeps it >= 1 (``1.50 GiB``, ``12.0 MiB``)."""
    for unit, size in (("GiB", GIB), ("MiB", MIB), ("KiB", KIB)):
        if n >= size:
            return f"{n / size:.2f} {unit}" if unit == "GiB" else f"{n / size:.1f} {unit}"
    return f"{n} B"


def _count(n: int) -> str:
    for unit, size in (("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return str(n)


def _dtype(b: int) -> str:
    return {4: "fp32", 2: "16-bit", 1: "8-bit"}[b]


def estimate_memory(policy: ModelMemory, training: Training, work: Workload, rewards: tuple[RewardMemory, ...] = (),
                    *, autocast: bool = True, device: str = "cuda", cuda_context: int = CUDA_CONTEXT) -> Estimate:
    """The predicted peak memory of one step of ``work`` on one device, as rows by phase.

    ``always``: weights, trainable parameters, optimizer states, reference and reward models,
    the CUDA context. Then the phases of a step, one after the other: ``update`` (gradients,
    activations, logits and transients of one micro-batch), and for PPO/GRPO ``generate`` (KV
    cache), ``score`` (the no-grad passes over the rollout: old log-probs, values, reference)
    and ``reward``; DPO's ``reference`` pass. Peak = ``always`` + the largest phase.
    """
    num = numerics(policy.dtype_bytes, policy.quantization, autocast, device)
    # 1. what every phase holds: weights, trainable parameters and their optimizer states
    rows, weights = _weight_rows(policy, num)
    trainable_rows, trainable, grad_bytes = _trainable_rows(policy, training, work, num)
    rows += trainable_rows
    # A full fine-tuning's reference is a deep copy of the policy, value head included.
    value_head = (policy.shape.hidden + 1) * num.adapter if work.value_head else 0
    rows += _reference_rows(work, weights.total + value_head)
    rows += _reward_rows(policy, work, rewards, num, autocast, device)
    if device == "cuda":
        rows.append(Row("CUDA context (assumed)", cuda_context, "always", "not in torch.cuda.max_memory_allocated"))
    else:
        rows.append(Row("process: Python, torch, transformers, lightning", CPU_PROCESS, "always",
                        "resident before any tensor (measured on CPU)"))
    # 2. the update of one micro-batch; 3. PPO/GRPO's rollout, DPO's reference pass
    rows += _update_rows(policy, training, work, num, trainable, grad_bytes)
    rows += _rollout_rows(policy, work, num)
    if work.fsdp2:
        rows = _fsdp2_rows(rows, policy, work, num, weights)
    note = ("activation and KV-cache dtypes follow lit_rlhf's load path (measured on CPU; bitsandbytes' "
            "CUDA kernels are assumed to return the same dtypes)")
    return Estimate(tuple(rows), (note,))


def _weight_rows(policy: ModelMemory, num: Numerics) -> tuple[list[Row], WeightBytes]:
    shape, quant = policy.shape, policy.quantization
    w = weight_bytes(shape, num, quant, policy.double_quant, policy.dtype_bytes, policy.task)
    fmt = {"none": _dtype(policy.dtype_bytes), "8bit": "8-bit", "4bit-nf4": "NF4", "4bit-fp4": "FP4"}.get(quant, quant)
    dq = " + double-quant constants" if is_4bit(quant) and policy.double_quant else ""
    head = "score head" if policy.task == "seq_cls" else ("LM head" if shape.head_params else "LM head tied")
    return [
        Row(f"weights: {shape.layers * len(shape.layer_linears)} linear layers ({_count(shape.linear_weights)} "
            f"params), {fmt}{dq}", w.linears, "always", sharded=True),
        Row(f"weights: embeddings, {head}, norms, biases ({_count(w.other_params)} params), {_dtype(num.weight)}",
            w.others, "always", sharded=True),
    ], w


def _trainable_rows(policy: ModelMemory, training: Training, work: Workload,
                    num: Numerics) -> tuple[list[Row], int, int]:
    """Rows of the trainable parameters and optimizer states; the trainable count and gradient bytes."""
    shape = policy.shape
    value_head = shape.hidden + 1 if work.value_head else 0
    score_head = shape.hidden if policy.task == "seq_cls" else 0
    rows = ([Row(f"value head ({value_head:,} params, fp32)", value_head * num.adapter, "always", sharded=True)]
            if value_head else [])
    if training.full:
        trainable = shape.params if policy.task == "causal_lm" else shape.params - shape.head_params + score_head
        grad_bytes = trainable * policy.dtype_bytes + value_head * num.adapter
        state = (optimizer_state_bytes(trainable, policy.dtype_bytes, training.optimizer)
                 + optimizer_state_bytes(value_head, num.adapter, training.optimizer))
        label = f"full fine-tuning: {_count(trainable + value_head)} trainable params"
    else:
        adapters = lora_params(shape, training.lora_targets, training.lora_r)
        # peft's SEQ_CLS task trains a copy of the score head (modules_to_save), beside the original.
        saved = training.modules_to_save_params + score_head
        trainable = adapters + saved + value_head
        names = sorted({lin.name.rpartition(".")[2] for lin in training.lora_targets})
        targets = (f"all {len(names)} linears" if len(training.lora_targets) == len(shape.layer_linears) > 3
                   else ", ".join(names))
        rows.insert(0, Row(f"LoRA adapters: r={training.lora_r} on {targets} ({_count(adapters)} params, "
                           f"{_dtype(num.adapter)})", adapters * num.adapter, "always", sharded=True))
        if saved:
            rows.append(Row(f"modules_to_save: trained copies ({_count(saved)} params, {_dtype(num.weight)})",
                            saved * num.weight, "always", sharded=True))
        grad_bytes = (adapters + value_head) * num.adapter + saved * num.weight
        state = (optimizer_state_bytes(adapters + value_head, num.adapter, training.optimizer)
                 + optimizer_state_bytes(saved, num.weight, training.optimizer))
        label = f"LoRA: {_count(trainable)} trainable params"
    moments = "8-bit AdamW" if training.optimizer == "adamw8bit" else "AdamW: 2 moments in the params' dtype"
    rows.append(Row(f"optimizer states ({moments})", state, "always", label, sharded=True))
    return rows, trainable, grad_bytes


def _reference_rows(work: Workload, copy_bytes: int) -> list[Row]:
    if work.reference == "adapters":
        return [Row("reference: the same base with adapters disabled", 0, "always")]
    if work.reference == "copy":
        return [Row("reference: a frozen copy of the model (full fine-tuning)", copy_bytes, "always", sharded=True)]
    if work.reference == "precomputed":
        return [Row("reference: a frozen copy of the model (full fine-tuning)", copy_bytes, "reference",
                    "freed after the reference log-probs are precomputed", sharded=True)]
    return []


def _reward_rows(policy: ModelMemory, work: Workload, rewards: tuple[RewardMemory, ...], num: Numerics,
                 autocast: bool, device: str) -> list[Row]:
    """The reward role(s): none (rule-based), an adapter on the policy's base, or models of their own."""
    if work.stage not in ("ppo", "grpo"):
        return []
    shape = policy.shape
    rows = [] if any(r.kind != "none" for r in rewards) else [Row("reward: rule-based, no model", 0, "always")]
    for reward in rewards:
        text = min(reward.max_length, work.prompt_length + work.new_tokens)
        batch = min(reward.batch_size, work.rollout_rows)
        if reward.kind == "adapter":
            rows.append(Row(f"reward: LoRA adapter + score head on the policy's base ({_count(reward.lora_params)} "
                            "params, fp32)", (reward.lora_params + shape.hidden) * 4, "always", reward.label))
            rows.append(Row(f"reward forward: {batch} x {text} tokens on the policy's trunk (no grad)",
                            inference_layer_bytes(shape, num, batch * text), "reward"))
        elif reward.kind == "model":
            rm = reward.model
            rnum = numerics(rm.dtype_bytes, rm.quantization, autocast, device)
            weights = weight_bytes(rm.shape, rnum, rm.quantization, rm.double_quant, rm.dtype_bytes, "seq_cls")
            kind = {"none": _dtype(rm.dtype_bytes), "8bit": "8-bit"}.get(rm.quantization, "4-bit")
            rows.append(Row(f"reward model: {rm.shape.model_type}, {_count(rm.shape.params)} params, {kind}",
                            weights.total, "always", reward.label))
            rows.append(Row(f"reward forward: {batch} x {text} tokens (no grad)",
                            inference_layer_bytes(rm.shape, rnum, batch * text), "reward"))
    return rows


def _transients(policy: ModelMemory, num: Numerics) -> tuple[int, int]:
    """(LM head's 16-bit cast, the largest dequantized weight): what a forward makes and drops.

    Autocast casts a float32 weight to 16-bit at each use and keeps the cast while the backward
    needs it; the LM head's is ``V * h * 2`` (when the weights are float32). 8-/4-bit
    matmuls dequantize one weight at a time to 16-bit, in the forward and again in the backward.
    """
    shape = policy.shape
    head = shape.vocab * shape.hidden * 2 if num.autocast and num.weight == 4 and policy.task == "causal_lm" else 0
    dequant = max(lin.weights for lin in shape.layer_linears) * 2 if policy.quantization != "none" else 0
    return head, dequant


def _update_rows(policy: ModelMemory, training: Training, work: Workload, num: Numerics, trainable: int,
                 grad_bytes: int) -> list[Row]:
    """Gradients, activations, logits and transients of one micro-batch's forward + backward."""
    shape = policy.shape
    head_copy, dequant = _transients(policy, num)
    tokens = work.forward_tokens(work.micro_batch)
    sequences = tokens // work.seq_length
    kw = dict(full=training.full, lora_targets=training.lora_targets, lora_r=training.lora_r or 0,
              lora_dropout=training.lora_dropout, attention=training.attention, seq_length=work.seq_length)
    ckpt = "on" if training.gradient_checkpointing else "off"
    rows = [
        Row(f"gradients ({_count(trainable)} params)", grad_bytes, "update", sharded=True),
        Row(f"activations: {sequences} x {work.seq_length} tokens, checkpointing {ckpt}",
            activation_bytes(shape, num, tokens, checkpointing=training.gradient_checkpointing, **kw), "update",
            f"{gib(layer_activation_bytes(shape, num, **kw))} per token per layer"),
    ]
    scored = sequences * work.scored_tokens
    if work.stage == "sft":
        rows.append(Row(f"logits + their gradient: {work.micro_batch} x {work.scored_tokens} x {shape.vocab} vocab",
                        lm_loss_logits_bytes(scored, shape.vocab, num.compute), "update"))
    elif scored:
        label = (f"logits: {sequences} x {work.scored_tokens} scored tokens x {shape.vocab} vocab "
                 "(+ fp32 log-softmax)" if work.stage == "dpo" else
                 f"logits of one chunk of the LM head: up to {max(1, LOGPROB_CHUNK_ELEMENTS // shape.vocab)} tokens x "
                 f"{shape.vocab} vocab, recomputed in the backward")
        size = (scored * shape.vocab * (4 + num.compute) if work.stage == "dpo"
                else sampled_logprob_bytes(scored, shape.vocab, num.compute))
        rows.append(Row(label, size, "update"))
    # Autocast's casts of fp32 weights: LoRA adapters (trainable: cached for the forward), every
    # layer's linears when the base is fp32 (only the recomputed layer's under checkpointing).
    lora = 0 if training.full else lora_params(shape, training.lora_targets, training.lora_r)
    adapters = 2 * lora if num.autocast else 0
    fp32_base = num.autocast and policy.quantization == "none" and policy.dtype_bytes == 4
    layers = (1 if training.gradient_checkpointing else shape.layers) if fp32_base else 0
    copies = head_copy + adapters + layers * 2 * sum(lin.weights for lin in shape.layer_linears)
    if copies and not (work.fsdp2 and num.autocast):  # fsdp2 gathers the weights in 16-bit already
        rows.append(Row("autocast 16-bit copies of fp32 weights kept for the backward", copies, "update"))
    if dequant:
        rows.append(Row("dequantized weight of the largest linear (transient)", dequant, "update"))
    if work.ddp:
        rows.append(Row("DDP gradient buckets", grad_bytes, "update"))
    return rows


def _rollout_rows(policy: ModelMemory, work: Workload, num: Numerics) -> list[Row]:
    """PPO/GRPO: sampling with a KV cache, then the no-grad passes over the whole rollout; DPO:
    the reference pass."""
    shape = policy.shape
    head_copy, dequant = _transients(policy, num)
    if work.stage == "dpo" and work.reference != "none":
        tokens, scored = work.micro_batch * work.seq_length, work.micro_batch * work.scored_tokens
        return [Row(f"reference pass: {work.micro_batch} x {work.seq_length} tokens (no grad)",
                    inference_layer_bytes(shape, num, tokens) + scored * shape.vocab * num.compute, "reference")]
    if work.stage not in ("ppo", "grpo"):
        return []
    rows, length = work.rollout_rows, work.prompt_length + work.new_tokens
    passes = "old log-probs + values, reference" if work.value_head else "old log-probs, reference"
    # Each no-grad pass runs in pieces of the pass budget; its LM head a chunk at a time.
    piece = work.forward_tokens(rows)
    return [
        Row(f"KV cache: {rows} x {length} tokens, keys {_dtype(num.key)}, values {_dtype(num.value)}",
            kv_cache_bytes(shape, rows, length, num.key, num.value), "generate"),
        Row(f"prefill ({work.prompts} x {work.prompt_length} tokens) and sampling temporaries",
            inference_layer_bytes(shape, num, work.prompts * work.prompt_length)
            + sampling_bytes(rows, shape.vocab, num.compute) + head_copy + dequant, "generate"),
        Row(f"scoring passes ({passes}): {rows} x {length} tokens (no grad), {piece} tokens per forward",
            inference_layer_bytes(shape, num, piece) + piece * shape.hidden * num.stream
            + scoring_logprob_bytes(piece, shape.vocab, num.compute) + head_copy + dequant, "score"),
    ]


def _fsdp2_rows(rows: list[Row], policy: ModelMemory, work: Workload, num: Numerics,
                weights: WeightBytes) -> list[Row]:
    """Under fsdp2 over N ranks: the sharded rows at 1/N per rank (or in CPU memory), plus what
    is gathered whole for a while: the root unit (embeddings, head, norms) and two transformer
    blocks (the one computing and the one prefetched) in every pass, one block's unsharded
    gradients before their reduce-scatter, and the whole policy for sampling when
    ``gather_for_sampling``. Gathered weights are 16-bit under bf16-mixed (FSDP2's mixed precision)."""
    n, shape = work.fsdp2, policy.shape
    out = []
    for row in rows:
        if not row.sharded:
            out.append(row)
        elif work.cpu_offload:
            out.append(replace(row, bytes=0, note=f"in CPU memory (cpu_offload): {gib(-(-row.bytes // n))} per rank"))
        else:
            out.append(replace(row, bytes=-(-row.bytes // n), note="; ".join(x for x in (row.note, f"1/{n} per rank")
                                                                              if x)))
    gathered = num.compute if num.autocast else policy.dtype_bytes
    block = shape.linear_weights // max(shape.layers, 1) * gathered
    root = weights.other_params * gathered
    units = Row("fsdp2: root unit + 2 blocks gathered (one computing, one prefetched)", root + 2 * block, "update")
    phases = dict.fromkeys(row.phase for row in rows if row.phase not in ("always", "generate"))
    out += [replace(units, phase=phase) for phase in phases]
    out.append(Row("fsdp2: one block's unsharded gradients before the reduce-scatter (fp32)",
                   shape.linear_weights // max(shape.layers, 1) * 4, "update"))
    if work.stage in ("ppo", "grpo"):
        whole = (shape.linear_weights + weights.other_params) * gathered
        out.append(Row("fsdp2: the whole policy gathered for sampling (gather_for_sampling)", whole, "generate")
                   if work.gather_for_sampling else replace(units, phase="generate"))
    return out


def with_assumptions(estimate: Estimate, *lines: str, title: str | None = None,
                     alternative: tuple[str, int] | None = None) -> Estimate:
    """``estimate`` with more assumption lines (and a title, an alternative total)."""
    return replace(estimate, assumptions=(*lines, *estimate.assumptions),
                   title=estimate.title if title is None else title,
                   alternative=estimate.alternative if alternative is None else alternative)


__all__ = [
    "ArchShape", "Estimate", "LinearShape", "ModelMemory", "Numerics", "RewardMemory", "Row", "Training",
    "Workload", "activation_bytes", "estimate_memory", "gib", "inference_layer_bytes", "kv_cache_bytes",
    "layer_activation_bytes", "linear_role", "llama_shape", "lm_loss_logits_bytes", "lora_params",
    "scoring_logprob_bytes",
    "lora_target_linears", "numerics", "optimizer_state_bytes", "quantized_weight_bytes", "sampled_logprob_bytes",
    "sampling_bytes", "weight_bytes", "with_assumptions",
]
