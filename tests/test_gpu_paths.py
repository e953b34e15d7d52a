"""The GPU-only paths, shown on a CPU: a second device stood in for by ``meta`` tensors, a fake
flash-attention kernel registered with transformers, bf16 precision, and CUDA faked where only
the decision matters. Each test here failed on the code before the GPU fixes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from lit_rlhf.models import ModelConfig, load_model
from lit_rlhf.modules.base import non_finite
from tests.conftest import TINY_LLAMA

# ------------------------------------------------------------------ 1. divergence guard


def test_divergence_guard_reads_tensors_on_several_devices_one_sync_each(monkeypatch):
    # Unfused AdamW on a GPU: `step` on the CPU, the moments on the GPU (here: meta).
    named = [("w:step", torch.tensor(3.0)), ("w:exp_avg", torch.zeros(4, device="meta")),
             ("v", torch.tensor([1.0, float("nan")])), ("u", torch.ones(3))]
    syncs = []
    tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: syncs.append(t.device) or tolist(t))
    assert non_finite(named) == ["v"]
    assert syncs == [torch.device("cpu")]  # one host sync for the CPU tensors; meta holds no values


# ------------------------------------------------------------------ 2. packing under flash attention


def fake_flash_varlen(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                      cu_seq_lens_q=None, position_ids=None, **kwargs):
    """A stand-in for a flash kernel's variable-length path: causal SDPA per document.

    Like transformers' flash path it finds documents from position ids only in a one-row
    batch; a multi-row batch without ``cu_seq_lens`` would attend across documents, so it fails.
    """
    batch, heads, length, dim = query.shape
    if attention_mask is not None:
        raise AssertionError("flash attention takes no 4D mask")
    if cu_seq_lens_q is None:
        if batch > 1:
            raise AssertionError("multi-row batch without cu_seq_lens: documents would leak")
        starts = torch.ones(length, dtype=torch.bool)
        if position_ids is not None:
            starts[1:] = position_ids[0, 1:] != position_ids[0, :-1] + 1
        cu_seq_lens_q = torch.cat([starts.nonzero()[:, 0], torch.tensor([length])])
    q, k, v = (t.transpose(1, 2).reshape(batch * length, -1, dim) for t in (query, key, value))
    bounds = cu_seq_lens_q.tolist()
    out = torch.cat([
        F.scaled_dot_product_attention(q[a:b].transpose(0, 1), k[a:b].transpose(0, 1), v[a:b].transpose(0, 1),
                                       is_causal=True, scale=scaling).transpose(0, 1)
        for a, b in zip(bounds[:-1], bounds[1:])
    ])
    return out.reshape(batch, length, heads, dim), None


@pytest.fixture(params=["flash_attention_fake", "kernels-community/fake-flash-attn"])
def flash_name(request):
    # Both families: a flash_attention_* name and a hub kernel's name (no common prefix).
    AttentionInterface.register(request.param, fake_flash_varlen)
    AttentionMaskInterface.register(request.param, AttentionMaskInterface._global_mapping["flash_attention_2"])
    yield request.param
    AttentionInterface._global_mapping.pop(request.param)
    AttentionMaskInterface._global_mapping.pop(request.param)


def test_packed_sft_rows_stay_isolated_under_flash_attention(tokenizer, flash_name):
    from lit_rlhf.modules import SFTModule

    module = SFTModule(ModelConfig(arch=TINY_LLAMA, tokenizer="demo"))
    module.configure_model()
    module.eval()
    docs = [torch.randint(5, 200, (n,)) for n in (5, 11, 7, 9)]  # rows: [5 + 11], [7 + 9]
    ids = torch.stack([torch.cat(docs[:2]), torch.cat(docs[2:])])
    positions = torch.stack([torch.cat([torch.arange(len(d)) for d in docs[:2]]),
                             torch.cat([torch.arange(len(d)) for d in docs[2:]])])
    with torch.no_grad():
        alone = [module(d[None])[0] for d in docs]  # sdpa, one document per call
        module.model.config._attn_implementation = flash_name
        packed = module(ids, positions)
    assert torch.allclose(packed[0], torch.cat(alone[:2]), atol=1e-5)
    assert torch.allclose(packed[1], torch.cat(alone[2:]), atol=1e-5)


def test_flash_attention_that_is_not_installed_fails_at_config_time(tokenizer):
    from lit_rlhf.modules import SFTModule

    for name, missing in (("flash_attention_2", "flash_attn package is not installed"),
                          ("kernels-community/flash-attn2", "hub kernel kernels-community/flash-attn2")):
        with pytest.raises(ValueError, match=rf"model.init_args.lm.attn_implementation='{name}': the .*{missing}.*"):
            SFTModule(ModelConfig(arch=TINY_LLAMA, tokenizer="demo", attn_implementation=name))


# ------------------------------------------------------------------ 3. 4-bit compute dtype


def test_4bit_matmuls_compute_in_autocasts_dtype(tokenizer):
    import bitsandbytes as bnb
    import lightning as L

    from lit_rlhf.models import compute_dtype_for
    from tests.modules.ppo_helpers import make_module

    assert compute_dtype_for("bf16-mixed", torch.float32) == torch.bfloat16
    assert compute_dtype_for("bf16-true", torch.float32) == torch.bfloat16
    assert compute_dtype_for("16-mixed", torch.float32) == torch.float16
    assert compute_dtype_for("32-true", torch.bfloat16) == torch.bfloat16  # no autocast: the weights'
    module = make_module(quantization="4bit-nf4")
    module.trainer = L.Trainer(accelerator="cpu", precision="bf16-mixed", logger=False)
    module.configure_model()
    layers = [m for m in module.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and {m.compute_dtype for m in layers} == {torch.bfloat16}


# ------------------------------------------------------------------ 4. heads in full precision


def _trainer(tmp_path, precision, rollouts=2, **kwargs):
    import lightning as L

    return L.Trainer(accelerator="cpu", precision=precision, max_epochs=1, limit_train_batches=rollouts,
                     limit_val_batches=0, default_root_dir=tmp_path, logger=False, enable_progress_bar=False,
                     enable_checkpointing=False, enable_model_summary=False, num_sanity_val_steps=0, **kwargs)


def test_values_are_float32_under_bf16_mixed(tokenizer):
    from tests.modules.ppo_helpers import make_module

    module = make_module()
    module.configure_model()
    ids = torch.randint(5, 200, (2, 6))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = module.policy(ids, torch.ones_like(ids))
    assert out.values.dtype == torch.float32
    # Computed in float32, not rounded through bf16: equal to the head applied by hand in float32.
    with torch.no_grad():
        module.policy.value_head.weight.normal_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = module.policy(ids, torch.ones_like(ids))
        hidden = module.policy.base_model.get_decoder()(input_ids=ids, attention_mask=torch.ones_like(ids))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            hidden = module.policy.base_model.get_decoder()(input_ids=ids, attention_mask=torch.ones_like(ids))
        expected = module.policy.value_head(hidden.last_hidden_state.float()).squeeze(-1)
    torch.testing.assert_close(out.values, expected, atol=1e-6, rtol=1e-6)


@pytest.mark.slow
def test_ppo_grpo_and_rm_train_in_bf16_true(tmp_path, tokenizer):
    from lit_rlhf.data import PreferenceDataModule
    from lit_rlhf.models import LoraSettings
    from lit_rlhf.modules import GRPOModule, RewardModule
    from lit_rlhf.modules.grpo import GRPOConfig
    from lit_rlhf.modules.ppo import SamplingConfig
    from lit_rlhf.optim import OptimConfig
    from tests.modules.ppo_helpers import LetterReward, make_data, make_module

    ppo = make_module()
    _trainer(tmp_path / "ppo", "bf16-true").fit(ppo, make_data(ppo))
    assert ppo.rollouts_done == 2 and ppo.policy.value_head.weight.dtype == torch.bfloat16
    assert all(torch.isfinite(p).all() for p in ppo.parameters())
    lm = ModelConfig(arch=TINY_LLAMA, tokenizer="demo", lora=LoraSettings(r=4, alpha=8, dropout=0.0))
    grpo = GRPOModule(lm, LetterReward(), optim=OptimConfig(lr=1e-3), grpo=GRPOConfig(num_generations=2, mini_batch_size=8),
                      sampling=SamplingConfig(min_new_tokens=3, max_new_tokens=6), rollout_batch_size=4)
    _trainer(tmp_path / "grpo", "bf16-true").fit(grpo, make_data(grpo, 4))
    assert grpo.rollouts_done == 2
    rm = RewardModule(ModelConfig(arch=TINY_LLAMA, tokenizer="demo"), OptimConfig(lr=1e-3, warmup_steps=0))
    dm = PreferenceDataModule(path="demo", batch_size=4, max_length=64, tokenizer=rm.tokenizer,
                              max_train_pairs=8, val_size=8)
    trainer = _trainer(tmp_path / "rm", "bf16-true", rollouts=2)
    trainer.fit(rm, dm)
    assert trainer.global_step == 2


# ------------------------------------------------------------------ 5. precision after the accelerator


def test_precision_default_follows_the_accelerator(monkeypatch, tmp_path):
    from lit_rlhf.recipes import default_precision
    from lit_rlhf.cli.lightning import LitRLHFCLI, cli_kwargs

    assert default_precision("cpu", bf16_gpu=True) == "32-true"
    assert default_precision("auto", bf16_gpu=True) == default_precision("gpu", bf16_gpu=True) == "bf16-mixed"
    assert default_precision(None, bf16_gpu=False) == "32-true"
    # A machine with a bf16 GPU, a config that asks for the CPU: full precision.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    args = ["--model=lit_rlhf.modules.SFTModule", f"--model.lm={{'arch': {TINY_LLAMA}, 'tokenizer': 'demo'}}",
            "--data=lit_rlhf.data.SFTDataModule", "--data.path=demo", "--data.seq_length=64", "--trainer.accelerator=cpu",
            f"--trainer.default_root_dir={tmp_path}"]
    cli = LitRLHFCLI(**cli_kwargs(args, run=False, save_config_callback=None))
    assert cli.trainer.precision == "32-true"


# ------------------------------------------------------------------ 8. other sharded strategies refused


@pytest.mark.parametrize("strategy", ["fsdp", "deepspeed_stage_3", "lightning.pytorch.strategies.FSDPStrategy",
                                      "lightning.pytorch.strategies.ModelParallelStrategy"])
def test_other_sharded_strategies_are_refused_in_one_line_before_weights_load(cli, strategy):
    arg = (f"--trainer.strategy={strategy}" if "." not in strategy
           else f"--trainer.strategy={{'class_path': '{strategy}'}}")
    out = cli.run(["fit", "-c", "configs/sft/demo.yaml", arg, "--trainer.max_steps=1"])
    assert out.code == 2, out.stderr[-2000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: trainer.strategy='{strategy}' is not supported by lit_rlhf's modules: "
                           "to shard a model, use fsdp2")


# ------------------------------------------------------------------ 9. validation metrics


def test_validation_scores_from_the_cpu_go_to_the_metrics_device():
    # On a GPU, torchmetrics' NaN filter indexes a CPU score with a mask on the GPU (the weight's
    # device) and fails; a CPU cannot run that filter on a stand-in device, so the test checks
    # that every value validation hands a metric is on the module's device first.
    from tests.modules.ppo_helpers import make_module

    module = make_module()
    module._device = torch.device("meta")
    for value in ([1.0, float("nan")], torch.tensor([float("nan"), 2.0]), 0.5):
        assert module._as_metric_value(value).device.type == "meta"


# ------------------------------------------------------------------ 7. DDP: one all-reduce per step

DDP_ACCUMULATION = """
import contextlib, sys, torch, lightning as L
sys.path.insert(0, {root!r})
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from lightning.pytorch.strategies import DDPStrategy
from lit_rlhf.modules.ppo import PPOConfig
from tests.modules.ppo_helpers import make_module, make_data

calls = []
def counting_allreduce(state, bucket):
    calls.append(1)
    return default_hooks.allreduce_hook(state, bucket)

class CountAllReduces(L.Callback):
    # Lightning registers DDPStrategy(ddp_comm_hook=...) on CUDA only: register it here.
    def on_train_start(self, trainer, module):
        trainer.strategy.model.register_comm_hook(None, counting_allreduce)

def run(sync_every_micro_batch):
    calls.clear()
    L.seed_everything(3)
    module = make_module(ppo=PPOConfig(mini_batch_size=4, gradient_accumulation_steps=2, ppo_epochs=2))
    strategy = DDPStrategy(process_group_backend="gloo")
    if sync_every_micro_batch:  # the behaviour before block_backward_sync
        strategy.block_backward_sync = contextlib.nullcontext
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_epochs=1, limit_train_batches=2,
                        limit_val_batches=0, default_root_dir={out!r}, enable_progress_bar=False, logger=False,
                        enable_checkpointing=False, enable_model_summary=False, callbacks=[CountAllReduces()])
    trainer.fit(module, make_data(module))
    return len(calls), trainer.global_step, {{n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}}

once = run(False)
every = run(True)
torch.save({{"once": once, "every": every}}, {out!r} + f"/rank{{dist.get_rank()}}.pt")
"""


@pytest.mark.slow
def test_ddp_update_all_reduces_once_per_optimizer_step(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    script = tmp_path / "ddp_accumulation.py"
    script.write_text(DDP_ACCUMULATION.format(root=str(root), out=str(tmp_path)))
    out = subprocess.run([sys.executable, str(script)], cwd=root, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    (calls_once, steps, weights_once), (calls_every, steps_every, weights_every) = r0["once"], r0["every"]
    assert steps == steps_every == 2 * 2 * 2  # rollouts x epochs x minibatches of 4 from 8
    # Gradient accumulation over 2 micro-batches: half the all-reduces, one per optimizer step.
    assert calls_once > 0 and calls_every == 2 * calls_once and calls_once % steps == 0
    for name in weights_once:  # the same update, and the ranks in lockstep
        torch.testing.assert_close(weights_once[name], weights_every[name], atol=1e-6, rtol=1e-6)
        assert torch.equal(weights_once[name], r1["once"][2][name]), name


# ------------------------------------------------------------------ 10. random init off the GPU


@pytest.mark.parametrize("quantization", ["none", "4bit-nf4"])
def test_random_init_is_built_on_the_cpu_under_another_default_device(tokenizer, quantization):
    # Lightning calls configure_model under torch.device(<the GPU>); meta stands in for it here.
    from lit_rlhf.models import LoraSettings

    lora = LoraSettings(r=4) if quantization != "none" else None
    cfg = ModelConfig(arch=TINY_LLAMA, tokenizer="demo", quantization=quantization, lora=lora)
    with torch.device("meta"):
        model = load_model(cfg, tokenizer)
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    reference = load_model(cfg, tokenizer)  # and the same base as built without the context
    for (name, a), b in zip(model.state_dict().items(), reference.state_dict().values()):
        if torch.is_tensor(a) and a.is_floating_point() and "lora_" not in name:  # LoRA A: the global RNG
            assert torch.equal(a, b), name


def test_packed_dpo_and_reward_rows_under_flash_attention_equal_segment_attention(flash_name):
    from lit_rlhf.data.preference import Pair, pack_pairs
    from lit_rlhf.modules import DPOModule, RewardModule

    dpo = DPOModule(ModelConfig(arch=TINY_LLAMA, tokenizer="demo"))
    dpo.configure_model()
    rm = RewardModule(ModelConfig(arch=TINY_LLAMA, tokenizer="demo"))
    rm.configure_model()
    pairs = [Pair([3, 7, 9, 11, 4], [3, 7, 9, 5], 0.0, 3), Pair([8, 6, 12, 13, 14, 2], [8, 6, 2], 0.0, 2)]
    batch = pack_pairs(pairs, 0)
    with torch.no_grad():
        segment = (dpo.sequence_logps(dpo.model, batch)[0],
                   rm.forward_packed(batch["input_ids"], batch["position_ids"], batch["lengths"]))
        dpo.model.config._attn_implementation = rm.model.config._attn_implementation = flash_name
        flash = (dpo.sequence_logps(dpo.model, batch)[0],
                 rm.forward_packed(batch["input_ids"], batch["position_ids"], batch["lengths"]))
    for a, b in zip(segment, flash):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
