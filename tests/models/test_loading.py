"""Model loading: fp32 / 8-bit / 4-bit + LoRA, and the CPU 4-bit gradient hazard."""

from __future__ import annotations

import os
import socket

import pytest
import torch
from torch import nn

from lit_rlhf.models import (
    LoraSettings,
    ModelConfig,
    atomic_dir,
    disable_cpu_4bit_repacking,
    load_model,
    max_positions,
)
from lit_rlhf.objectives.lm import causal_lm_loss
from tests.conftest import TINY_LLAMA

LORA = LoraSettings(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj", "up_proj"])


def _batch(tokenizer, n=2, t=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, len(tokenizer), (n, t), generator=g)


@pytest.mark.parametrize("quantization", ["none", "8bit", "4bit-nf4", "4bit-fp4"])
def test_forward_backward_trains_only_adapters(tokenizer, quantization):
    cfg = ModelConfig(arch=TINY_LLAMA, tokenizer="unused", quantization=quantization, lora=LORA)
    model = load_model(cfg, tokenizer)
    ids = _batch(tokenizer)
    loss = causal_lm_loss(model(input_ids=ids).logits, ids).loss
    assert torch.isfinite(loss)
    loss.backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    # LoRA B starts at zero, so A gets no gradient on the first step but B must.
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in trainable.items() if "lora_B" in n)
    if quantization != "none":
        import bitsandbytes as bnb

        kind = bnb.nn.Linear8bitLt if quantization == "8bit" else bnb.nn.Linear4bit
        assert any(isinstance(m, kind) for m in model.modules())


def test_full_finetune_trains_everything_and_init_is_seeded(tokenizer):
    a = load_model(ModelConfig(arch=TINY_LLAMA, tokenizer="unused", seed=3), tokenizer)
    b = load_model(ModelConfig(arch=TINY_LLAMA, tokenizer="unused", seed=3), tokenizer)
    c = load_model(ModelConfig(arch=TINY_LLAMA, tokenizer="unused", seed=4), tokenizer)
    assert all(p.requires_grad for p in a.parameters())
    wa, wb, wc = (m.model.layers[0].self_attn.q_proj.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)
    assert a.config.vocab_size == len(tokenizer)
    assert a.config.eos_token_id == tokenizer.eos_token_id


def _lora_grads(model) -> dict[str, torch.Tensor]:
    # A missing gradient counts as zero: the hazard can cut the graph altogether.
    return {n: torch.zeros_like(p) if p.grad is None else p.grad.clone()
            for n, p in model.named_parameters() if p.requires_grad}


def _loss(model, ids):
    return causal_lm_loss(model(input_ids=ids).logits, ids).loss


def _four_bit_grads_vs_dequantized(tokenizer, keep_fast_path: bool):
    """LoRA grads through 4-bit layers after an eval no-grad forward, and the reference
    grads with each 4-bit layer swapped for an fp32 Linear holding its dequantized weight."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as F

    cfg = ModelConfig(arch=TINY_LLAMA, tokenizer="unused", quantization="4bit-nf4", lora=LORA)
    model = load_model(cfg, tokenizer)
    with torch.no_grad():  # nonzero B so that A's gradient is exercised too
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    # Dequantize before any forward: the hazard changes the stored layout.
    dense = {n: F.dequantize_4bit(m.weight.data, m.weight.quant_state).float() for n, m in layers.items()}
    if keep_fast_path:
        for m in layers.values():
            m.support_avx512bf16_for_cpu = True

    ids = _batch(tokenizer, seed=1)
    model.eval()
    with torch.no_grad():  # what a PPO rollout does
        model(input_ids=ids)
    model.train()
    _loss(model, ids).backward()
    got = _lora_grads(model)

    model.zero_grad()
    for name, weight in dense.items():
        parent, _, child = name.rpartition(".")
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        linear.weight = nn.Parameter(weight, requires_grad=False)
        setattr(model.get_submodule(parent), child, linear)
    _loss(model, ids).backward()
    return got, _lora_grads(model)


def test_4bit_lora_gradients_match_dequantized_reference_after_eval_forward(tokenizer):
    got, want = _four_bit_grads_vs_dequantized(tokenizer, keep_fast_path=False)
    assert got.keys() == want.keys()
    for name in got:
        torch.testing.assert_close(got[name], want[name], rtol=1e-3, atol=1e-6, msg=name)


def _cpu_has_avx512_bf16() -> bool:
    try:
        return "avx512_bf16" in open("/proc/cpuinfo").read()
    except OSError:
        return False


@pytest.mark.skipif(not _cpu_has_avx512_bf16(), reason="the hazard only exists on CPUs with AVX512-BF16")
def test_4bit_hazard_is_real_without_the_guard(tokenizer):
    # Control for the test above: with bitsandbytes' CPU fast path left on, the gradients are
    # wrong, so the guard in load_model is what makes them right.
    got, want = _four_bit_grads_vs_dequantized(tokenizer, keep_fast_path=True)
    rel = [((got[n] - want[n]).norm() / want[n].norm()).item() for n in got]
    assert max(rel) > 0.05


def test_guard_counts_layers(tokenizer):
    cfg = ModelConfig(arch=TINY_LLAMA, tokenizer="unused", quantization="4bit-nf4", lora=LORA)
    model = load_model(cfg, tokenizer)
    assert disable_cpu_4bit_repacking(model) == 0  # load_model already applied it
    n_linear = 2 * 7  # 2 layers x (q, k, v, o, gate, up, down)
    import bitsandbytes as bnb

    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules()) == n_linear


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(), "exactly one of"),
        (dict(name_or_path="gpt2", arch="demo-tiny"), "exactly one of"),
        (dict(arch="demo-tiny"), "tokenizer is required"),
        (dict(arch="demo-tiny", tokenizer="demo", quantization="8bit"), "needs `lora`"),
        (dict(arch="demo-tiny", tokenizer="demo", lora=dict(r=0)), "lora.r"),
    ],
)
def test_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**kwargs)


def test_missing_arch_file_is_named(tmp_path):
    cfg = ModelConfig(arch=str(tmp_path / "nope.json"), tokenizer="demo")
    with pytest.raises(FileNotFoundError, match="nope.json"):
        cfg.architecture()


def test_max_positions_reads_the_config(tokenizer):
    assert max_positions(ModelConfig(arch=TINY_LLAMA, tokenizer="x").architecture(tokenizer)) == 256
    gpt2 = dict(model_type="gpt2", n_positions=128, n_embd=64, n_layer=1, n_head=2)
    assert max_positions(ModelConfig(arch=gpt2, tokenizer="x").architecture(tokenizer)) == 128


def test_atomic_dir_keeps_the_old_version_on_failure(tmp_path):
    target = tmp_path / "adapter"
    with atomic_dir(target) as tmp:
        (tmp / "w").write_text("v1")
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "w").write_text("half")
            raise RuntimeError("crash mid-write")
    assert (target / "w").read_text() == "v1"
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]  # no temp debris


def test_temporaries_of_a_killed_save_are_removed_by_the_next_save(tmp_path):
    import subprocess
    import sys

    # A process that dies (SIGKILL) inside atomic_dir leaves its hidden temporary folder.
    code = ("import os, signal; from lit_rlhf.models import atomic_dir\n"
            f"with atomic_dir({str(tmp_path / 'adapter')!r}) as tmp:\n"
            "    (tmp / 'w').write_text('half'); os.kill(os.getpid(), signal.SIGKILL)\n")
    assert subprocess.run([sys.executable, "-c", code]).returncode == -9
    [left] = tmp_path.iterdir()
    assert left.name.startswith(".adapter.tmp-")
    # Another process's temporary, still alive (this one): kept.
    alive = tmp_path / f".adapter.tmp-{socket.gethostname()}-{os.getpid()}-abc"
    alive.mkdir()
    with atomic_dir(tmp_path / "adapter") as tmp:
        (tmp / "w").write_text("v2")
    assert sorted(p.name for p in tmp_path.iterdir()) == [alive.name, "adapter"]


def test_pretrained_models_load_in_train_mode(tmp_path, tokenizer):
    # from_pretrained gives eval mode; training with it would silently disable dropout.
    load_model(ModelConfig(arch=TINY_LLAMA, tokenizer="x"), tokenizer).save_pretrained(tmp_path)
    model = load_model(ModelConfig(name_or_path=str(tmp_path), lora=LORA), tokenizer)
    assert all(m.training for m in model.modules())


@pytest.mark.parametrize("field", ["name_or_path", "tokenizer"])
def test_a_missing_local_model_path_is_named_not_looked_up_on_the_hub(field, tmp_path):
    missing = str(tmp_path / "no-such-model")
    kwargs = {"name_or_path": missing} if field == "name_or_path" else {"arch": "demo-tiny", "tokenizer": missing}
    with pytest.raises(FileNotFoundError, match=f"model.init_args.lm.{field}: no such directory '{missing}'"):
        ModelConfig(**kwargs)


def test_a_missing_reward_model_path_fails_at_construction(tmp_path):
    from lit_rlhf.rewards import RewardModelReward

    with pytest.raises(FileNotFoundError, match="model.init_args.reward.init_args.path: no such directory"):
        RewardModelReward(str(tmp_path / "no-such-rm"))
    assert RewardModelReward("some-org/some-model").path == "some-org/some-model"  # a hub id: loaded lazily
