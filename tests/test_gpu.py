"""Every stage on CUDA through the Trainer: bf16-mixed, validation and checkpoints on, a 4-bit base
with LoRA (SFT, PPO, GRPO), the reward model served as an adapter, the step-0 invariants, resume,
and fsdp2 on one GPU.

Off by default; `pytest -m gpu` runs them (scripts/gpu_check.sh does, with the quick GPU
benchmark). On a machine without CUDA, `-m gpu` fails in one line (tests/conftest.py) instead of
skipping: a silent skip would hide that nothing ran. ``LIT_RLHF_GPU_TEST_DEVICE=cpu`` runs the
same code on the CPU, to check the tests themselves where no GPU is at hand.
"""

from __future__ import annotations

import os

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lit_rlhf.data import PreferenceDataModule, PromptDataModule, SFTDataModule
from lit_rlhf.models import LoraSettings, ModelConfig, load_model, load_tokenizer
from lit_rlhf.modules import DPOModule, GRPOModule, PPOModule, RewardModule, SFTModule
from lit_rlhf.modules.grpo import GRPOConfig
from lit_rlhf.modules.ppo import PPOConfig, SamplingConfig
from lit_rlhf.optim import OptimConfig
from lit_rlhf.rewards import AdapterReward
from tests.conftest import TINY_LLAMA
from tests.modules.ppo_helpers import LetterReward

pytestmark = pytest.mark.gpu

DEVICE = os.environ.get("LIT_RLHF_GPU_TEST_DEVICE", "cuda")
LORA = LoraSettings(r=8, alpha=16, dropout=0.0, target_modules="all-linear")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A random-init base on disk: what every stage starts from, as a real run would."""
    root = tmp_path_factory.mktemp("gpu_base")
    tokenizer = load_tokenizer("demo")
    load_model(ModelConfig(arch=TINY_LLAMA, tokenizer="demo"), tokenizer).save_pretrained(root)
    tokenizer.save_pretrained(root)
    return str(root)


def _lm(base, quantization="none", lora=LORA):
    return ModelConfig(name_or_path=base, dtype="bfloat16", quantization=quantization, lora=lora)


def _trainer(root, steps, every=1, val_every=None, **kwargs):
    """bf16-mixed on the device, a checkpoint every `every` steps, validation every `val_every`."""
    kwargs.setdefault("max_steps", steps)
    return L.Trainer(accelerator="gpu" if DEVICE == "cuda" else "cpu", devices=1, precision="bf16-mixed",
                     default_root_dir=root, max_epochs=1, log_every_n_steps=1, enable_progress_bar=False,
                     num_sanity_val_steps=0, val_check_interval=val_every or steps, limit_val_batches=2,
                     callbacks=[ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=every, save_last=True,
                                                save_top_k=-1)], **kwargs)


def _finite(module) -> bool:
    # A sharded (fsdp2) parameter is checked as this rank's shard.
    local = lambda p: p.to_local() if hasattr(p, "to_local") else p  # noqa: E731
    return all(torch.isfinite(local(p)).all() for p in module.parameters() if p.requires_grad)


def _first_update(module) -> dict:
    """Records the statistics of the first update micro-batch of a run."""
    seen, loss = {}, module.loss

    def recording(sub, *args):
        value, stats = loss(sub, *args)
        seen.setdefault("stats", {k: v.detach().float().cpu() for k, v in stats.items()})
        return value, stats

    module.loss = recording
    return seen


def _first_rollout_stats(module) -> dict:
    """Records the statistics the online core logs for its first rollout (name -> float)."""
    seen, log_step = {}, module._log_step

    def recording(stats):
        if not seen:
            seen.update({k: float(v) for k, v in stats.items()})
        log_step(stats)

    module._log_step = recording
    return seen


def test_sft_4bit_lora_trains_validates_and_resumes(base, tmp_path):
    def run(steps, ckpt=None):
        module = SFTModule(_lm(base, "4bit-nf4"), OptimConfig(lr=1e-3, warmup_steps=0), seq_length=64)
        data = SFTDataModule(path="demo", seq_length=64, batch_size=4, tokenizer=module.tokenizer, val_size=16)
        trainer = _trainer(tmp_path, steps, val_every=2, gradient_clip_val=1.0)  # unfused AdamW + the guard
        trainer.fit(module, data, ckpt_path=ckpt)
        return trainer, module

    trainer, module = run(3)
    assert trainer.global_step == 3 and _finite(module)
    assert torch.isfinite(trainer.callback_metrics["val/loss"])
    assert (tmp_path / "ckpt" / "last.ckpt").is_file()
    trainer, module = run(5, ckpt=str(tmp_path / "ckpt" / "last.ckpt"))
    assert trainer.global_step == 5 and _finite(module)


def test_reward_model_trains_and_serves_ppo_as_an_adapter_with_ratio_one_at_step_0(base, tmp_path):
    rm = RewardModule(_lm(base), OptimConfig(lr=1e-3, warmup_steps=0))
    data = PreferenceDataModule(path="demo", batch_size=4, max_length=64, tokenizer=rm.tokenizer,
                                max_train_pairs=16, val_size=8)
    trainer = _trainer(tmp_path / "rm", 3, gradient_clip_val=1.0)
    trainer.fit(rm, data)
    assert trainer.global_step == 3 and "val/accuracy" in trainer.callback_metrics
    adapter = rm.export_dir
    assert (adapter / "adapter_model.safetensors").is_file()

    policy = PPOModule(_lm(base, "4bit-nf4"), AdapterReward(str(adapter), normalize=False, batch_size=4),
                       ppo=PPOConfig(mini_batch_size=8, ppo_epochs=2),
                       sampling=SamplingConfig(min_new_tokens=3, max_new_tokens=8), rollout_batch_size=8)
    first, logged = _first_update(policy), _first_rollout_stats(policy)
    prompts = PromptDataModule("demo", batch_size=8, val_size=8, tokenizer=policy.tokenizer)
    trainer = _trainer(tmp_path / "ppo", -1, limit_train_batches=2, val_every=2)  # 2 rollouts, validated after
    trainer.fit(policy, prompts)
    assert policy.rollouts_done == 2 and _finite(policy)
    # Zero LoRA B: the policy is the reference, and the old log-probs are the first update's.
    stats = first["stats"]
    assert stats["ratio_mean"].item() == 1.0 and stats["ratio_max"].item() == 1.0, stats
    assert logged["objective/kl"] == 0.0, logged  # adapters off on the same 4-bit base: the reference
    assert policy.policy.value_head.weight.dtype == torch.float32


def test_grpo_4bit_lora_ratio_one_kl_zero_and_resume(base, tmp_path):
    def run(rollouts, ckpt=None):
        module = GRPOModule(_lm(base, "4bit-nf4"), LetterReward(), optim=OptimConfig(lr=1e-3),
                            grpo=GRPOConfig(num_generations=4, mini_batch_size=16, kl_loss_coef=0.04),
                            sampling=SamplingConfig(min_new_tokens=3, max_new_tokens=8), rollout_batch_size=4)
        first = _first_update(module)
        trainer = _trainer(tmp_path, rollouts, val_every=1)  # one optimizer step per rollout
        trainer.fit(module, PromptDataModule("demo", batch_size=4, val_size=8, tokenizer=module.tokenizer), ckpt_path=ckpt)
        return trainer, module, first

    trainer, module, first = run(2)
    stats = first["stats"]
    assert stats["ratio_mean"].item() == 1.0 and stats["kl"].item() == 0.0, stats
    assert module.rollouts_done == 2 and _finite(module)
    trainer, module, _ = run(3, ckpt=str(tmp_path / "ckpt" / "last.ckpt"))
    assert module.rollouts_done == 3 and _finite(module)


def test_dpo_lora_trains_and_validates(base, tmp_path):
    module = DPOModule(_lm(base), optim=OptimConfig(lr=1e-3, warmup_steps=0))
    data = PreferenceDataModule(path="demo", batch_size=4, max_length=64, tokenizer=module.tokenizer,
                                max_train_pairs=16, val_size=8)
    trainer = _trainer(tmp_path, 3, gradient_clip_val=1.0)
    trainer.fit(module, data)
    assert trainer.global_step == 3 and _finite(module)
    assert "val/rewards/accuracy" in trainer.callback_metrics


def test_fsdp2_on_the_gpu_keeps_ratio_one_and_kl_zero_and_resumes(base, tmp_path):
    # One GPU is a mesh of one: the CUDA side of sharding (NCCL, FSDP2's bf16 policy, the sharded
    # checkpoint and its resume); the two-process equivalence runs on CPUs in tests/test_fsdp2.py.
    from lit_rlhf.strategies import FSDP2Strategy

    def run(rollouts, ckpt=None):
        module = GRPOModule(_lm(base), LetterReward(), optim=OptimConfig(lr=1e-3),
                            grpo=GRPOConfig(num_generations=4, mini_batch_size=16, kl_loss_coef=0.04),
                            sampling=SamplingConfig(min_new_tokens=3, max_new_tokens=8), rollout_batch_size=4)
        first = _first_update(module)
        trainer = _trainer(tmp_path, rollouts, val_every=1, strategy=FSDP2Strategy())
        trainer.fit(module, PromptDataModule("demo", batch_size=4, val_size=8, tokenizer=module.tokenizer), ckpt_path=ckpt)
        return trainer, module, first

    trainer, module, first = run(2)
    stats = first["stats"]
    assert stats["ratio_mean"].item() == 1.0 and stats["kl"].item() == 0.0, stats
    assert (tmp_path / "ckpt" / "last.ckpt" / "meta.pt").is_file()  # sharded: a folder
    trainer, module, _ = run(3, ckpt=str(tmp_path / "ckpt" / "last.ckpt"))
    assert module.rollouts_done == 3 and _finite(module)
