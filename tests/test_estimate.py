"""The memory estimator: formulas against hand-computed numbers and against what the real tiny
models hold (bitsandbytes storage, peft's trainable parameters, autograd's saved tensors, the
KV cache of generation); the ``estimate`` command on real configs; one-line errors."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
import torch

from lit_rlhf.models.compat import output_cache
from lit_rlhf.cli import main
from lit_rlhf.estimate import RewardSpec, arch_shape, estimate_stage, parse_memory
from lit_rlhf.estimate import memory as M
from lit_rlhf.models import LoraSettings, ModelConfig, PolicyWithValueHead, load_model

ROOT = Path(__file__).resolve().parents[1]
# 2 layers, 64 wide, 4 heads; vocabulary fixed so that the byte counts are exact integers.
TINY = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4, vocab_size=1000, max_position_embeddings=256, tie_word_embeddings=False)
# Grouped-query attention and an MLP width unlike the hidden size, to tell the terms apart.
GQA = dict(TINY, intermediate_size=192, num_key_value_heads=2)


def _shape(arch: dict = TINY) -> M.ArchShape:
    from transformers import AutoConfig

    fields = dict(arch)
    return arch_shape(AutoConfig.for_model(fields.pop("model_type"), **fields))


def _lm(arch: dict = TINY, **kw) -> ModelConfig:
    return ModelConfig(arch=arch, tokenizer="demo", **kw)


# ------------------------------------------------------------------------------ shapes and weights


def test_meta_shape_of_a_llama_equals_the_hand_written_one():
    shape = _shape()
    assert shape == M.llama_shape(64, 2, 4, 4, 128, vocab=1000)
    # 7 linears of 64x64 (q, k, v, o) and 64x128 (gate, up, down) per layer, two 1000 x 64 tables, norms.
    assert shape.params == 2 * (4 * 64 * 64 + 3 * 64 * 128) + 2 * 1000 * 64 + 5 * 64 == 210240


def test_weight_bytes_fp32_bf16_nf4_8bit_exact():
    shape = M.llama_shape(64, 2, 4, 4, 128, vocab=1000)
    fp32, bf16 = M.numerics(4, autocast=False), M.numerics(2)
    assert M.weight_bytes(shape, fp32).total == 210240 * 4 == 840960
    assert M.weight_bytes(shape, bf16).total == 210240 * 2
    nf4 = M.numerics(2, "4bit-nf4")
    # A 64x64 weight: 2048 packed bytes + 64 uint8 absmax + 4 offset + 64 code + 4 (second-level
    # absmax) + 1024 (its code) = 3208; 64x128: 4096 + 128 + 4 + 64 + 4 + 1024 = 5320.
    assert M.quantized_weight_bytes(64, 64, "4bit-nf4") == 3208
    assert M.quantized_weight_bytes(64, 128, "4bit-nf4") == 5320
    assert M.quantized_weight_bytes(64, 64, "4bit-nf4", double_quant=False) == 2048 + 4 * 64 + 64
    w = M.weight_bytes(shape, nf4, "4bit-nf4")
    assert w.linears == 2 * (4 * 3208 + 3 * 5320) == 57584
    # Embeddings, LM head and norms stay unquantized, in the configured dtype (bf16 here).
    assert w.others == (2 * 1000 * 64 + 5 * 64) * 2 == 256640
    int8 = M.weight_bytes(shape, M.numerics(2, "8bit"), "8bit")
    assert int8.linears == 2 * (4 * (4096 + 4 * 64) + 2 * (8192 + 4 * 128) + (8192 + 4 * 64))


def _stored_bytes(model) -> int:
    """Bytes of every parameter and bitsandbytes quantization constant, each storage once."""
    seen: dict[int, int] = {}

    def add(t):
        if isinstance(t, torch.Tensor):
            seen.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())

    for p in model.parameters():
        add(p)
        for name in ("SCB",):
            add(getattr(p, name, None))
        state = getattr(p, "quant_state", None)
        if state is not None:
            for t in (state.absmax, state.code, state.offset):
                add(t)
            if state.state2 is not None:
                add(state.state2.absmax)
                add(state.state2.code)
    return sum(seen.values())


@pytest.mark.parametrize("quantization, double_quant", [("4bit-nf4", True), ("4bit-nf4", False), ("8bit", True)])
def test_weight_bytes_equal_what_bitsandbytes_stores(quantization, double_quant, tokenizer):
    pytest.importorskip("bitsandbytes")
    lm = _lm(dtype="bfloat16", quantization=quantization, double_quant=double_quant, lora=LoraSettings(r=4))
    model = load_model(lm, tokenizer)
    lora = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "lora_" in n)
    predicted = M.weight_bytes(_shape(), M.numerics(2, quantization), quantization, double_quant).total
    assert _stored_bytes(model) - lora == predicted


# ------------------------------------------------------------------------------ trainable parameters


ARCHS = {
    "llama": TINY,
    "gpt2": dict(model_type="gpt2", n_embd=64, n_layer=2, n_head=4, vocab_size=1000, n_positions=128),
    "gpt_neox": dict(model_type="gpt_neox", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=256, vocab_size=1000, max_position_embeddings=128),
}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("targets", [None, "all-linear", "q_proj|query_key_value|c_attn"])
def test_lora_params_equal_peft_trainable_count(arch, targets, tokenizer):
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS

    fields = ARCHS[arch]
    shape = _shape(fields)
    if targets and "|" in targets:  # a list of names, each model's attention input
        targets = [t for t in targets.split("|") if any(lin.name.endswith(t) for lin in shape.layer_linears)]
    model = load_model(_lm(fields, lora=LoraSettings(r=8, target_modules=targets)), tokenizer)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    linears = M.lora_target_linears(shape, targets, tuple(DEFAULTS.get(shape.model_type, ())))
    assert linears
    assert M.lora_params(shape, linears, 8) == trainable
    assert shape.params == sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)


def test_lora_targets_follow_peft_matching():
    shape = M.llama_shape(64, 2, 4, 4, 128)
    def names(targets):
        return [lin.name for lin in M.lora_target_linears(shape, targets, ("q_proj", "v_proj"))]

    assert names(None) == ["self_attn.q_proj", "self_attn.v_proj"]
    assert names(["o_proj", "mlp.down_proj"]) == ["self_attn.o_proj", "mlp.down_proj"]
    assert names(r".*\.mlp\..*") == ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    assert names(["proj"]) == []  # a name matches whole path components only
    assert M.linear_role("self_attn.o_proj") == "attn_out" and M.linear_role("mlp.c_proj") == "mlp_out"
    assert M.linear_role("attn.c_proj") == "attn_out" and M.linear_role("fc1") == "mlp_in"


# ------------------------------------------------------------------------------ activations


def _saved_bytes_per_layer(lm: ModelConfig, tokenizer, batch: int, seq: int, autocast: bool) -> int:
    """Bytes autograd saves in one decoder layer for a (batch, seq) forward: a 3-layer model's
    saved bytes minus a 2-layer one's, parameters excluded, each storage once."""
    out = []
    for layers in (2, 3):
        cfg = ModelConfig(**{**lm.__dict__, "arch": {**lm.arch, "num_hidden_layers": layers}})
        model = load_model(cfg, tokenizer)
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        seen: dict[int, int] = {}

        def pack(t, params=params, seen=seen):
            storage = t.untyped_storage()
            if storage.data_ptr() not in params:
                seen.setdefault(storage.data_ptr(), storage.nbytes())
            return t

        ids = torch.randint(0, 1000, (batch, seq), generator=torch.Generator().manual_seed(0))
        context = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), context:
            model(input_ids=ids, use_cache=False)
        out.append(sum(seen.values()))
    return out[1] - out[0]


ACTIVATION_CASES = {
    # name: (model settings, autocast)
    "fp32 full": (dict(), False),
    "bf16 full, autocast": (dict(dtype="bfloat16"), True),
    "fp32 weights, autocast": (dict(), True),
    "bf16 LoRA all-linear": (dict(dtype="bfloat16", lora=LoraSettings(r=8, target_modules="all-linear")), True),
    "nf4 LoRA q,v": (dict(dtype="bfloat16", quantization="4bit-nf4", lora=LoraSettings(r=8)), True),
    "eager attention": (dict(dtype="bfloat16", attn_implementation="eager"), True),
    "checkpointing": (dict(dtype="bfloat16", lora=LoraSettings(r=8), gradient_checkpointing=True), True),
}


@pytest.mark.parametrize("case", ACTIVATION_CASES)
def test_layer_activations_equal_what_autograd_saves(case, tokenizer):
    settings, autocast = ACTIVATION_CASES[case]
    if settings.get("quantization"):
        pytest.importorskip("bitsandbytes")
    lm = _lm(GQA, **settings)
    batch, seq = 2, 16
    measured = _saved_bytes_per_layer(lm, tokenizer, batch, seq, autocast)
    shape = _shape(GQA)
    num = M.numerics(2 if lm.dtype == "bfloat16" else 4, lm.quantization, autocast, device="cpu")
    full = lm.lora is None
    targets = M.lora_target_linears(shape, lm.lora.target_modules, ("q_proj", "v_proj")) if lm.lora else ()
    if lm.gradient_checkpointing:
        per_token = num.stream * shape.hidden  # each layer keeps its input alone
        copies = 0
    else:
        per_token = M.layer_activation_bytes(shape, num, full=full, lora_targets=targets, lora_r=8,
                                             lora_dropout=lm.lora.dropout if lm.lora else 0.0,
                                             attention=lm.attn_implementation or "sdpa", seq_length=seq)
        # Autocast's 16-bit casts of trainable fp32 weights, once per forward and layer.
        layer = M.llama_shape(64, 1, 4, 2, 192, vocab=0)
        copies = (2 * M.lora_params(layer, targets, 8) if lm.lora else
                  2 * layer.linear_weights if autocast and lm.dtype == "float32" else 0)
    assert measured == batch * seq * per_token + copies


def _saved_by(fn, logits: torch.Tensor) -> tuple[int, bool]:
    """(bytes autograd keeps for the backward of ``fn(logits)`` beyond ``logits``, whether it keeps ``logits``)."""
    own = logits.untyped_storage().data_ptr()
    seen: dict[int, int] = {}

    def pack(t):
        seen.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(logits)
    return sum(n for ptr, n in seen.items() if ptr != own), own in seen


def test_logits_kept_for_the_backward():
    from lit_rlhf.objectives.lm import causal_lm_loss
    from lit_rlhf.objectives.logprobs import logprobs_from_logits

    batch, tokens, vocab = 3, 7, 50
    logits = torch.randn(batch, tokens, vocab, dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, vocab, (batch, tokens))
    # Sampled-token log-probs keep each row's float32 log-softmax (the 4 of 4 + c) and per token
    # its label (int64, the gather's index); the 16-bit logits themselves are not kept.
    kept, logits_kept = _saved_by(lambda x: logprobs_from_logits(x, labels), logits)
    upcast = M.sampled_logprob_bytes(batch * tokens, vocab, 2) - batch * tokens * vocab * 2
    assert kept == upcast + batch * tokens * 8 and not logits_kept
    # SFT's chunked cross-entropy keeps the logits themselves (its gradient is the other c) and,
    # per token, only a target, a mask and a float32 logsumexp: no float32 copy of the logits.
    kept, logits_kept = _saved_by(lambda x: causal_lm_loss(x, labels).loss, logits)
    assert logits_kept and kept < batch * tokens * (8 + 1 + 4) + 64


def test_llama_7b_full_activation_formula_matches_the_docstring():
    shape = M.llama_shape(4096, 32, 32, 32, 11008)
    a = M.layer_activation_bytes(shape, M.numerics(2), full=True)
    assert a == 20 * 4096 + 4 * 4096 + 8 * 11008 + 4 * 32 + 8


# ------------------------------------------------------------------------------ KV cache


@pytest.mark.parametrize("dtype, quantization, autocast", [
    ("float32", "none", False), ("float32", "none", True), ("bfloat16", "none", True), ("bfloat16", "4bit-nf4", True)])
def test_kv_cache_bytes_equal_the_dynamic_cache(dtype, quantization, autocast, tokenizer):
    if quantization != "none":
        pytest.importorskip("bitsandbytes")
    lora = LoraSettings(r=4) if quantization != "none" else None
    policy = PolicyWithValueHead(load_model(_lm(GQA, dtype=dtype, quantization=quantization, lora=lora),
                                            tokenizer, dropout=False)).eval()
    rows, prompt, new = 3, 5, 4
    ids = torch.randint(0, 1000, (rows, prompt), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    context = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with torch.no_grad(), context:
        out = policy(ids, mask, torch.arange(prompt).expand(rows, -1), use_cache=True, with_values=False,
                     logits_slice=slice(-1, None))
        cache = output_cache(out)
        for step in range(new):  # the tokens a rollout feeds back one at a time
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            mask = torch.cat([mask, torch.ones_like(token)], 1)
            out = policy(token, mask, torch.full((rows, 1), prompt + step), cache=cache, use_cache=True,
                         with_values=False)
            cache = output_cache(out)
    actual = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    if dtype == "bfloat16":  # also on a k-bit base: no float32 residual stream, no float32 cache
        assert {t.dtype for layer in cache.layers for t in (layer.keys, layer.values)} == {torch.bfloat16}
    num = M.numerics(2 if dtype == "bfloat16" else 4, quantization, autocast, device="cpu")
    # The cache holds every fed token: the prompt and all but the last sampled one... plus it.
    assert actual == M.kv_cache_bytes(_shape(GQA), rows, prompt + new, num.key, num.value)
    assert M.kv_cache_bytes(M.llama_shape(4096, 32, 32, 32, 11008), 1, 1, 2, 2) == 2 * 32 * 4096 * 2


# ------------------------------------------------------------------------------ the Python API


ARCH_1B = dict(model_type="llama", hidden_size=2048, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4, intermediate_size=5632, vocab_size=32000, max_position_embeddings=4096,
               tie_word_embeddings=False)


def test_estimate_stage_for_the_1b_nf4_ppo_benchmark_job():
    lm = _lm(ARCH_1B, dtype="bfloat16", quantization="4bit-nf4", gradient_checkpointing=True,
             lora=LoraSettings(r=16, alpha=32, dropout=0.0, target_modules="all-linear"))
    job = dict(batch_size=8, prompt_length=32, new_tokens=32, mini_batch_size=8)
    rule = estimate_stage(lm, "ppo", **job)
    adapter = estimate_stage(lm, "ppo", **job, reward=RewardSpec("adapter", lora_r=16, target_modules="all-linear"))
    separate = estimate_stage(lm, "ppo", **job, reward=RewardSpec("model", arch=ARCH_1B, dtype="bfloat16",
                                                                  quantization="4bit-nf4"))
    assert rule.allocated < adapter.allocated < separate.allocated
    assert adapter.total - adapter.allocated == M.CUDA_CONTEXT
    shape = M.llama_shape(2048, 22, 32, 4, 5632)
    nf4 = sum(M.quantized_weight_bytes(lin.in_features, lin.out_features, "4bit-nf4") for lin in shape.layer_linears)
    assert rule.row("weights: 154 linear layers").bytes == 22 * nf4
    # 2 x 32000 x 2048 tables + norms, kept in bf16 (peft's k-bit preparation would upcast them).
    assert rule.row("weights: embeddings").bytes == (2 * 32000 * 2048 + 45 * 2048) * 2
    assert rule.row("KV cache").bytes == 22 * 4 * 64 * 8 * 64 * (2 + 2)  # bf16 keys and values
    # The reward adapter costs its LoRA weights and score head; a separate model its own weights.
    assert adapter.row("reward: LoRA adapter").bytes == (M.lora_params(shape, shape.layer_linears, 16) + 2048) * 4
    assert 500 * M.MIB < separate.row("reward model").bytes < 700 * M.MIB
    assert 1.0 * M.GIB < adapter.allocated < 2.5 * M.GIB


def test_full_fine_tuning_counts_gradients_adam_and_a_reference_copy():
    lm = _lm(TINY)
    est = estimate_stage(lm, "grpo", batch_size=2, prompt_length=8, new_tokens=8, num_generations=4,
                         precision="32-true", accelerator="cpu")
    params = M.llama_shape(64, 2, 4, 4, 128, vocab=1000).params
    assert est.row("gradients").bytes == params * 4
    assert est.row("optimizer states").bytes == params * 8
    assert est.row("reference: a frozen copy").bytes == params * 4
    assert not any(r.component.startswith("CUDA") for r in est.rows)
    sft = estimate_stage(_lm(TINY, dtype="bfloat16"), "sft", batch_size=4, seq_length=32)
    assert sft.row("optimizer states").bytes == params * 2 * 2  # torch keeps the moments in bf16
    assert sft.row("logits").bytes == M.lm_loss_logits_bytes(4 * 32, 1000, 2)


def test_fsdp2_shards_weights_gradients_and_optimizer_states_and_counts_what_it_gathers():
    lm = _lm(TINY)
    kw = dict(batch_size=2, prompt_length=8, new_tokens=8, num_generations=4, precision="32-true",
              accelerator="cpu", devices=4)
    ddp = estimate_stage(lm, "grpo", **kw)
    sharded = estimate_stage(lm, "grpo", fsdp2=4, **kw)
    shape = M.llama_shape(64, 2, 4, 4, 128, vocab=1000)
    for name in ("weights: 14", "weights: embeddings", "gradients", "optimizer states", "reference: a frozen copy"):
        assert sharded.row(name).bytes == -(-ddp.row(name).bytes // 4), name
    assert not any(r.component.startswith("DDP") for r in sharded.rows)
    block = shape.linear_weights // shape.layers * 4
    root = ddp.row("weights: embeddings").bytes
    assert sharded.row("fsdp2: root unit + 2 blocks").bytes == root + 2 * block
    assert sharded.row("fsdp2: the whole policy gathered").bytes == shape.linear_weights * 4 + root
    ungathered = estimate_stage(lm, "grpo", fsdp2=4, gather_for_sampling=False, **kw)
    assert not any(r.component.startswith("fsdp2: the whole policy") for r in ungathered.rows)
    offload = estimate_stage(lm, "grpo", fsdp2=4, cpu_offload=True, **kw)
    assert offload.row("optimizer states").bytes == 0 and "CPU memory" in offload.row("optimizer states").note


def test_cli_estimates_per_rank_under_fsdp2_and_refuses_a_quantized_base(capsys, no_weights):
    code, out, _ = _run(capsys, "-c", str(ROOT / "configs/sft/demo.yaml"), "--trainer.strategy=fsdp2",
                        "--trainer.devices=4", "--trainer.num_nodes=2")
    assert code == 0 and "fsdp2 over 8 ranks" in out and "1/8 per rank" in out, out
    code, _, err = _run(capsys, "-c", str(ROOT / "configs/sft/demo.yaml"), "--trainer.strategy=fsdp2",
                        "--model.init_args.lm.quantization=4bit-nf4", "--model.init_args.lm.lora.r=8")
    assert code == 2 and "cannot be sharded" in err, err


# The README's "Larger than one GPU" table: Llama-2 shapes, full fine-tuning, fp32 master weights.
LLAMA2 = {"7B": (4096, 11008, 32, 32, 32), "13B": (5120, 13824, 40, 40, 40), "70B": (8192, 28672, 80, 64, 8)}


def test_the_readme_fsdp2_table_is_the_estimators():
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("### Larger than one GPU"):readme.index("### Memory guide")]
    for name, (hidden, intermediate, layers, heads, kv) in LLAMA2.items():
        arch = dict(model_type="llama", hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                    num_attention_heads=heads, num_key_value_heads=kv, vocab_size=32000, max_position_embeddings=4096)
        lm = ModelConfig(arch=arch, tokenizer="demo", dtype="float32", gradient_checkpointing=True)
        shape = arch_shape(lm.architecture(None))
        common = dict(precision="bf16-mixed", devices=8, shape=shape)
        sft = dict(batch_size=1, seq_length=2048, **common)
        ppo = dict(batch_size=8, prompt_length=256, new_tokens=256, mini_batch_size=8, gradient_accumulation_steps=8,
                   **common)
        figures = [estimate_stage(lm, "sft", **sft), estimate_stage(lm, "sft", fsdp2=8, **sft),
                   estimate_stage(lm, "sft", fsdp2=8, cpu_offload=True, **sft),
                   estimate_stage(lm, "ppo", **ppo), estimate_stage(lm, "ppo", fsdp2=8, **ppo),
                   estimate_stage(lm, "ppo", fsdp2=8, gather_for_sampling=False, **ppo),
                   estimate_stage(lm, "ppo", fsdp2=8, gather_for_sampling=False, cpu_offload=True, **ppo)]
        row = next(line for line in section.splitlines() if line.startswith(f"| {name} |"))
        cells = [c.strip().replace("*", "").split(" ")[0].replace(",", "") for c in row.split("|")[2:-1]]
        for cell, est in zip(cells, figures, strict=True):
            assert abs(float(cell) - est.total / M.GIB) < 0.051 + (0.5 if est.total > 1000 * M.GIB else 0), (name, row)


def test_parse_memory_units():
    assert parse_memory("24GB") == 24 * 10**9
    assert parse_memory("24GiB") == parse_memory("24G") == 24 * 2**30
    assert parse_memory("24000MB") == 24 * 10**9
    assert parse_memory("80g") == 80 * 2**30
    assert parse_memory("1.5 GiB") == int(1.5 * 2**30)
    for bad in ("24XB", "GB", "-1GB", "0GB", "lots"):
        with pytest.raises(ValueError, match="--memory"):
            parse_memory(bad)


# ------------------------------------------------------------------------------ the command


def _run(capsys, *args: str) -> tuple[int, str, str]:
    code = 0
    try:
        main(["estimate", *args])
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def no_weights(monkeypatch):
    """Any attempt to read weights, or to build a demo model, fails the test."""
    import transformers

    import lit_rlhf.demo.models as demo_models

    def refuse(*args, **kwargs):
        raise AssertionError("the estimator must not load weights")

    for name in ("AutoModelForCausalLM", "AutoModelForSequenceClassification"):
        monkeypatch.setattr(getattr(transformers, name), "from_pretrained", refuse)
    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", refuse)
    monkeypatch.setattr(demo_models, "ensure_demo_model", refuse)
    monkeypatch.setattr("safetensors.torch.load_file", refuse)


def test_cli_ppo_demo_prints_a_table_that_does_not_fit_in_1mb(capsys, no_weights):
    code, out, err = _run(capsys, "-c", "configs/ppo/base.yaml", "-c", "configs/ppo/demo.yaml", "--memory", "1MB")
    assert code == 0, err
    assert "PPOModule" in out and "KV cache" in out and "LoRA adapters: r=16" in out
    assert "reward model: llama" in out  # demo-rm: a separate model of its own
    assert "total (peak):" in out and "with gradient checkpointing on:" in out
    assert "rollout per device = data.init_args.batch_size = 32 prompts" in out
    last = out.strip().splitlines()[-1]
    assert last.startswith("fits in 1MB") and ": no, " in last and "over" in last


def test_cli_sft_demo_fits(capsys, no_weights):
    code, out, err = _run(capsys, "-c", "configs/sft/demo.yaml", "--memory=80G")
    assert code == 0, err
    assert "SFTModule" in out and "16 x 128 tokens" in out and "full fine-tuning" in out
    assert "batch per device = data.init_args.batch_size = 16 chunks of 128 tokens" in out
    assert out.strip().splitlines()[-1].startswith("fits in 80G = 80.00 GiB: yes, ")


def test_cli_counts_a_multi_turn_episode_s_whole_token_budget(capsys, no_weights):
    code, out, err = _run(capsys, "-c", "configs/grpo/calculator.yaml", "--model.init_args.episodes.max_tokens=200")
    assert code == 0, err
    # 64 prompts x 8 episodes of 8 prompt tokens + 200 (not sampling.max_new_tokens = 64 of one turn)
    assert "KV cache: 512 x 208 tokens" in out and "episodes.max_tokens = 200 tokens" in out


def test_cli_reads_a_local_model_dir_and_overrides(capsys, tmp_path, no_weights):
    from transformers import AutoConfig

    fields = dict(ARCH_1B)
    AutoConfig.for_model(fields.pop("model_type"), **fields).save_pretrained(tmp_path / "llama")  # config.json only
    code, out, err = _run(capsys, "-c", "configs/sft/llama-7b-stack-exchange.yaml",
                          f"--model.init_args.lm.name_or_path={tmp_path / 'llama'}",
                          "--model.init_args.lm.quantization=4bit-nf4", "--trainer.precision=bf16-mixed")
    assert code == 0, err
    assert "154 linear layers" in out and "NF4" in out and "4 x 1024 tokens, checkpointing on" in out


def test_cli_ppo_with_an_arch_and_an_adapter_reward(capsys, tmp_path, no_weights):
    adapter = tmp_path / "rm-adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 4, "target_modules": ["q_proj"]}))
    arch = "{" + ", ".join(f"{k}: {v}" for k, v in TINY.items()) + "}"
    code, out, err = _run(capsys, "-c", "configs/ppo/demo.yaml", "--model.init_args.lm.name_or_path=null",
                          f"--model.init_args.lm.arch={arch}", "--model.init_args.lm.tokenizer=demo",
                          "--model.init_args.reward=lit_rlhf.rewards.AdapterReward",
                          f"--model.init_args.reward.init_args.adapter={adapter}", "--model.init_args.judge=null")
    assert code == 0, err
    shape = M.llama_shape(64, 2, 4, 4, 128, vocab=1000)
    expected = (M.lora_params(shape, shape.layer_linears[:1], 4) + 64) * 4
    assert f"reward: LoRA adapter + score head on the policy's base ({M._count(expected // 4 - 64)} params" in out
    assert "r=4, 1 linears per layer" in out


def _write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


@pytest.fixture
def bad_inputs(tmp_path) -> dict[str, tuple[list[str], str]]:
    no_lm = _write(tmp_path / "no_lm.yaml",
                   "model:\n  class_path: lit_rlhf.modules.SFTModule\ntrainer:\n  max_steps: 1\n")
    empty_dir = tmp_path / "empty_model"
    empty_dir.mkdir()
    broken = tmp_path / "broken_model"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    sft = "configs/sft/demo.yaml"
    lm = "--model.init_args.lm"
    return {
        # case: (arguments, what the one line must name)
        "missing config": (["-c", "configs/sft/nope.yaml"], "configs/sft/nope.yaml"),
        "no lm": (["-c", no_lm], "model.init_args.lm"),
        "bad memory": (["-c", sft, "--memory", "24XB"], "24XB"),
        "model dir without config.json": (["-c", sft, f"{lm}.arch=null", f"{lm}.name_or_path={empty_dir}"],
                                          "empty_model"),
        "unreadable config.json": (["-c", sft, f"{lm}.arch=null", f"{lm}.name_or_path={broken}"], "broken_model"),
        "missing model dir": (["-c", sft, f"{lm}.arch=null", f"{lm}.name_or_path=./no/such/dir"], "./no/such/dir"),
        "unknown lm field": (["-c", sft, f"{lm}.colour=red"], "colour"),
        "bad precision": (["-c", sft, "--trainer.precision=17-true"], "trainer.precision"),
        "bad target modules": (["-c", sft, f"{lm}.lora.target_modules=[nope]"], "target_modules"),
        "no config": ([], "no config"),
        "stray argument": (["-c", sft, "extra"], "extra"),
    }


@pytest.mark.parametrize("case", ["missing config", "no lm", "bad memory", "model dir without config.json",
                                  "unreadable config.json", "missing model dir", "unknown lm field", "bad precision",
                                  "bad target modules", "no config", "stray argument"])
def test_bad_input_ends_in_one_error_line(case, bad_inputs, capsys):
    args, named = bad_inputs[case]
    code, out, err = _run(capsys, *args)
    assert code == 2, (out, err)
    lines = [line for line in err.splitlines() if line.strip() and "Warning" not in line]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert named in lines[0], lines[0]
    assert "Traceback" not in err


# The published parameter counts of the models (their model cards and config.json).
PUBLISHED_PARAMS = {
    "huggyllama/llama-7b": 6_738_415_616, "meta-llama/Llama-2-7b-hf": 6_738_415_616,
    "mistralai/Mistral-7B-v0.1": 7_241_732_096, "TinyLlama/TinyLlama-1.1B-Chat-v1.0": 1_100_048_384,
    "EleutherAI/gpt-neox-20b": 20_554_567_680, "Qwen/Qwen2.5-0.5B-Instruct": 494_032_768,
    "Qwen/Qwen2.5-7B-Instruct": 7_615_616_512, "lvwerra/distilbert-imdb": 66_955_010,
}


def test_known_shapes_have_the_published_parameter_counts():
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    from lit_rlhf.estimate.config import KNOWN_SHAPES

    assert set(KNOWN_SHAPES) == set(PUBLISHED_PARAMS)
    for name, fields in KNOWN_SHAPES.items():
        fields = dict(fields)
        config = AutoConfig.for_model(fields.pop("model_type"), **fields)
        cls = AutoModelForSequenceClassification if "distilbert" in name else AutoModelForCausalLM
        with torch.device("meta"):
            model = cls.from_config(config)
        assert sum(p.numel() for p in model.parameters()) == PUBLISHED_PARAMS[name], name


@pytest.mark.parametrize("recipe", ["configs/sft/llama-7b-stack-exchange.yaml", "configs/ppo/gpt-neox-20b-sentiment.yaml",
                                    "configs/dpo/qwen-7b-ultrafeedback.yaml"])
def test_the_readme_real_model_estimates_run_offline(recipe, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hub"))  # nothing cached
    main(["estimate", "-c", str(ROOT / recipe), "--memory", "80GB"])
    out = capsys.readouterr().out
    assert "KNOWN_SHAPES" in out and "fits in 80GB" in out


def test_online_logits_are_counted_a_chunk_at_a_time_at_a_real_vocabulary():
    from lit_rlhf.estimate import memory as M
    from lit_rlhf.objectives import logprobs

    assert M.LOGPROB_CHUNK_ELEMENTS == logprobs.CHUNK_ELEMENTS  # the estimator follows the code
    vocab, chunk = 151_936, logprobs.CHUNK_ELEMENTS // 151_936  # 110 tokens of logits at a time
    # 8,192 scored tokens: one chunk's logits, log-softmax and their gradients, recomputed in the backward.
    assert M.sampled_logprob_bytes(8192, vocab, 4) == chunk * vocab * 16
    assert M.sampled_logprob_bytes(chunk, vocab, 4) == chunk * vocab * 8  # one chunk: kept as before
    assert M.scoring_logprob_bytes(8192, vocab, 2) == chunk * vocab * 10
    work = M.Workload("grpo", 16, 544, 512, pass_tokens=2000)
    assert work.forward_tokens(16) == 3 * 544  # whole sequences within the budget
    assert M.Workload("grpo", 16, 544, 512, pass_tokens=100).forward_tokens(16) == 544  # one at least
