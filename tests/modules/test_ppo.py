"""PPO: exact step-0 invariants, 4-bit hazard, learning, DDP, resume, bad settings."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from lit_rlhf.callbacks import NonFiniteLossError
from lit_rlhf.models import LoraSettings
from lit_rlhf.modules.ppo import KLConfig, PPOConfig, SamplingConfig
from lit_rlhf.modules.rollout import evaluate_actions
from lit_rlhf.objectives.policy import policy_loss
from lit_rlhf.optim import OptimConfig
from tests.modules.ppo_helpers import BrokenReward, make_batch, make_data, make_module, ready

ROOT = Path(__file__).resolve().parents[2]


def test_step_zero_policy_equals_reference_exactly():
    module = ready(make_module())
    batch = make_batch(module)
    rollout = module.rollout(batch, module.generator)
    # LoRA B starts at zero: adapters on or off give bit-identical log-probs.
    assert torch.equal(rollout.logprobs, rollout.ref_logprobs)
    # ... and the first PPO forward reproduces the rollout's log-probs: ratio exactly 1.
    logprobs, values, _ = evaluate_actions(module.policy, rollout, packed=module.update_config.packed)
    assert torch.equal(logprobs, rollout.logprobs) and torch.equal(values, rollout.values)
    mask = rollout.response_mask.float()
    _, stats = policy_loss(logprobs, rollout.logprobs, torch.randn_like(logprobs), mask, 0.2)
    assert stats.ratio_mean.item() == 1.0 and stats.approx_kl.item() == 0.0 and stats.clipfrac.item() == 0.0
    assert torch.count_nonzero(rollout.values) == 0  # zero-initialised value head


def test_full_finetune_reference_is_a_frozen_copy():
    module = ready(make_module(lora=None))
    rollout = module.rollout(make_batch(module), module.generator)
    assert torch.equal(rollout.logprobs, rollout.ref_logprobs)
    assert not any(p.requires_grad for p in module.ref_policy.parameters())
    assert all(p.requires_grad for p in module.policy.parameters())


def test_4bit_rollout_then_update_gives_exact_lora_gradients():
    """The CPU 4-bit hazard on a real cycle: rollout (eval, no grad) then a PPO backward."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as F
    from torch import nn

    module = ready(make_module(quantization="4bit-nf4", lora=LoraSettings(r=4, alpha=8, dropout=0.0)))
    with torch.no_grad():
        for name, p in module.policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    layers = {n: m for n, m in module.policy.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    dense = {n: F.dequantize_4bit(m.weight.data, m.weight.quant_state).float() for n, m in layers.items()}
    rollout = module.rollout(make_batch(module), module.generator)
    advantages = torch.randn_like(rollout.logprobs)

    def grads():
        module.policy.zero_grad()
        logprobs, _, _ = evaluate_actions(module.policy, rollout)
        policy_loss(logprobs, rollout.logprobs, advantages, rollout.response_mask.float(), 0.2)[0].backward()
        return {n: p.grad.clone() for n, p in module.policy.named_parameters() if p.requires_grad and p.grad is not None}

    got = grads()
    for name, weight in dense.items():
        parent, _, child = name.rpartition(".")
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        linear.weight = nn.Parameter(weight, requires_grad=False)
        setattr(module.policy.get_submodule(parent), child, linear)
    want = grads()
    assert got.keys() == want.keys() and len(got) > 0
    for name in got:
        torch.testing.assert_close(got[name], want[name], rtol=1e-3, atol=1e-6, msg=name)


def _fit(module, tmp_path, rollouts, batch=8, **kwargs):
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=rollouts, limit_val_batches=0,
                        default_root_dir=tmp_path, enable_progress_bar=False, log_every_n_steps=1,
                        num_sanity_val_steps=0, **kwargs)
    trainer.fit(module, make_data(module, batch=batch))
    return trainer


def test_short_fit_raises_the_score(tmp_path):
    scores = []
    # Full fine-tuning: LoRA leaves the random-init output layer as it is, which is slow to steer.
    module = make_module(lora=None, batch=16, ppo=PPOConfig(mini_batch_size=8, ppo_epochs=4),
                     optim=OptimConfig(lr=3e-3, min_lr_ratio=1.0), kl=KLConfig(adaptive=False, init_coef=0.05))
    log_step = module._log_step
    module._log_step = lambda stats: (scores.append(float(stats["env/score"])), log_step(stats))
    _fit(module, tmp_path, rollouts=30, batch=16)
    first, last = sum(scores[:5]) / 5, sum(scores[-5:]) / 5
    assert last > 1.5 * first, scores
    saved = next(tmp_path.glob("lightning_logs/version_*/model"))
    assert (saved / "model.safetensors").is_file() and (saved / "value_head.safetensors").is_file()


def test_bf16_mixed_step_clips_gradients_with_a_fused_optimizer(tmp_path):
    module = make_module(ppo=PPOConfig(mini_batch_size=4, ppo_epochs=1, max_grad_norm=1e-3))
    norms, clip = [], module._clip_gradients

    def recording_clip(optimizer, max_norm):
        clip(optimizer, max_norm)
        norms.append(float(torch.nn.utils.get_total_norm([p.grad for p in module.parameters() if p.grad is not None])))

    module._clip_gradients = recording_clip
    trainer = _fit(module, tmp_path, rollouts=2, precision="bf16-mixed")
    assert trainer.optimizers[0].defaults["fused"] is True
    assert len(norms) == 4 and max(norms) <= 1e-3 * (1 + 1e-4)  # 2 rollouts x 2 minibatches


def _trainable(module):
    return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}


def test_resume_continues_exactly_as_the_uninterrupted_run(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    # 4 rollouts; each is 2 PPO epochs x 2 minibatches = 4 optimizer steps, so a checkpoint
    # every 8 steps falls after rollout 2.
    straight = make_module()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=8, save_top_k=-1)
    _fit(straight, tmp_path / "a", rollouts=4, callbacks=[ckpt], logger=False)

    resumed = make_module()
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=4, limit_val_batches=0,
                        default_root_dir=tmp_path / "b", enable_progress_bar=False, logger=False,
                        enable_checkpointing=False)
    trainer.fit(resumed, make_data(resumed), ckpt_path=tmp_path / "ckpt" / "epoch=0-step=8.ckpt")

    assert resumed.rollouts_done == straight.rollouts_done == 4
    assert resumed.kl_ctl.value == straight.kl_ctl.value
    want, got = _trainable(straight), _trainable(resumed)
    assert want.keys() == got.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0, msg=name)
    # The checkpoint holds the adapter and value head, not the frozen base.
    # Plain types only: the checkpoint loads with weights_only=True.
    state = torch.load(tmp_path / "ckpt" / "epoch=0-step=8.ckpt", weights_only=True)["state_dict"]
    assert any("value_head" in k for k in state) and all("lora_" in k or "value_head" in k for k in state)


def test_minibatch_must_divide_the_rollout_batch():
    with pytest.raises(ValueError, match=r"mini_batch_size=3 does not divide the rollout batch size data.batch_size=8"):
        make_module(ppo=PPOConfig(mini_batch_size=3), batch=8)
    assert make_module(ppo=PPOConfig(mini_batch_size=4), batch=8).ppo.mini_batch_size == 4


def test_bad_sampling_and_ppo_settings():
    with pytest.raises(ValueError, match="min_new_tokens <= max_new_tokens, got 9 > 4"):
        SamplingConfig(min_new_tokens=9, max_new_tokens=4)
    with pytest.raises(ValueError, match="gradient_accumulation_steps=3 does not divide"):
        PPOConfig(mini_batch_size=8, gradient_accumulation_steps=3)


def test_reward_returning_nan_stops_with_a_message(tmp_path):
    module = make_module(reward=BrokenReward("nan"))
    with pytest.raises(NonFiniteLossError, match="8 non-finite score"):
        _fit(module, tmp_path, rollouts=1, logger=False)


def test_reward_of_the_wrong_shape_is_named(tmp_path):
    module = make_module(reward=BrokenReward("shape"))
    with pytest.raises(ValueError, match=r"reward function returned shape \(8, 2\); expected \(8,\)"):
        _fit(module, tmp_path, rollouts=1, logger=False)


DDP_SCRIPT = """
import sys, torch, lightning as L
sys.path.insert(0, {root!r})
from tests.modules.ppo_helpers import make_module, make_data
module = make_module()
trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=1, limit_train_batches=3,
                    limit_val_batches=0, default_root_dir={out!r}, enable_progress_bar=False, logger=False,
                    enable_checkpointing=False)
trainer.fit(module, make_data(module))
state = {{n: p.detach() for n, p in module.named_parameters() if p.requires_grad}}
torch.save({{"state": state, "kl": module.kl_ctl.value, "prompts": module.last_samples[0]["prompt"]}},
           {out!r} + f"/rank{{trainer.global_rank}}.pt")
"""


@pytest.mark.slow
def test_ddp_two_process_ranks_stay_identical(tmp_path):
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT.format(root=str(ROOT), out=str(tmp_path)))
    out = subprocess.run([sys.executable, str(script)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert r0["prompts"] != r1["prompts"]  # each rank sampled its own prompts...
    assert r0["kl"] == r1["kl"]  # ... yet the KL controller agrees
    for name in r0["state"]:  # ... and the weights stayed in lockstep
        assert torch.equal(r0["state"][name], r1["state"][name]), name
