"""PPO: exact step-0 invariants, rollout masks and cache, 4-bit hazard, learning, DDP, resume."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.testing import assert_close

from lit_rlhf.callbacks import NonFiniteLossError
from lit_rlhf.data import PromptDataModule
from lit_rlhf.heads import PolicyOutput
from lit_rlhf.models import LoraSettings, ModelConfig
from lit_rlhf.modules import PPOModule
from lit_rlhf.modules.ppo import KLConfig, PPOConfig, SamplingConfig
from lit_rlhf.optim import OptimConfig
from lit_rlhf.ppo_losses import policy_loss
from lit_rlhf.rewards import RewardFunction
from lit_rlhf.rollout import evaluate_actions, generate, sample_categorical
from tests.conftest import TINY_LLAMA

ROOT = Path(__file__).resolve().parents[1]
LORA = LoraSettings(r=8, alpha=16, dropout=0.1, target_modules="all-linear")


class LetterReward(RewardFunction):
    """How often ``letter`` occurs in the response: dense enough to learn in seconds."""

    def __init__(self, letter: str = "e") -> None:
        self.letter = letter

    def __call__(self, prompts, responses):
        return torch.tensor([float(r.count(self.letter)) for r in responses])


class BrokenReward(RewardFunction):
    def __init__(self, kind: str) -> None:
        self.kind = kind

    def __call__(self, prompts, responses):
        if self.kind == "nan":
            return torch.full((len(responses),), float("nan"))
        return torch.zeros(len(responses), 2)


def _module(reward=None, lora=LORA, quantization="none", batch=8, **kwargs):
    kwargs.setdefault("ppo", PPOConfig(mini_batch_size=4, ppo_epochs=2))
    kwargs.setdefault("sampling", SamplingConfig(min_new_tokens=3, max_new_tokens=8))
    kwargs.setdefault("optim", OptimConfig(lr=1e-3, min_lr_ratio=1.0))
    lm = ModelConfig(arch=TINY_LLAMA, tokenizer="demo", lora=lora, quantization=quantization)
    return PPOModule(lm, reward or LetterReward(), rollout_batch_size=batch, **kwargs)


def _data(module, batch=8, **kwargs):
    return PromptDataModule(batch_size=batch, val_size=16, tokenizer=module.tokenizer, **kwargs)


def _batch(module, n=8):
    dm = _data(module, batch=n)
    dm.setup("fit")
    return dm.train_dataloader().dataset.batch(0)


def _ready(module):
    module.configure_model()
    return module


def test_step_zero_policy_equals_reference_exactly():
    module = _ready(_module())
    batch = _batch(module)
    rollout = module.rollout(batch, module.generator)
    # LoRA B starts at zero: adapters on or off give bit-identical log-probs.
    assert torch.equal(rollout.logprobs, rollout.ref_logprobs)
    # ... and the first PPO forward reproduces the rollout's log-probs: ratio exactly 1.
    logprobs, values, _ = evaluate_actions(module.policy, rollout)
    assert torch.equal(logprobs, rollout.logprobs) and torch.equal(values, rollout.values)
    mask = rollout.response_mask.float()
    _, stats = policy_loss(logprobs, rollout.logprobs, torch.randn_like(logprobs), mask, 0.2)
    assert stats.ratio_mean.item() == 1.0 and stats.approx_kl.item() == 0.0 and stats.clipfrac.item() == 0.0
    assert torch.count_nonzero(rollout.values) == 0  # zero-initialised value head


def test_full_finetune_reference_is_a_frozen_copy():
    module = _ready(_module(lora=None))
    rollout = module.rollout(_batch(module), module.generator)
    assert torch.equal(rollout.logprobs, rollout.ref_logprobs)
    assert not any(p.requires_grad for p in module.ref_policy.parameters())
    assert all(p.requires_grad for p in module.policy.parameters())


class _ScriptedPolicy:
    """Emits a fixed token per step and row; records what it was asked."""

    def __init__(self, script: list[list[int]], vocab: int = 10) -> None:
        self.script, self.vocab, self.step = script, vocab, 0

    def __call__(self, input_ids, attention_mask, position_ids, cache=None, use_cache=False, with_values=True,
                 logits_slice=slice(None)):
        logits = torch.full((input_ids.size(0), input_ids.size(1), self.vocab), -1e9)
        for row, tokens in enumerate(self.script):
            logits[row, -1, tokens[min(self.step, len(tokens) - 1)]] = 0.0
        self.step += 1
        return PolicyOutput(logits, None, "cache")


def test_generate_stops_at_eos_and_masks_what_follows():
    eos, pad = 2, 0
    policy = _ScriptedPolicy([[5, 6, eos, 7, 8], [5, 6, 7, 8, 9], [eos, 9, 9, 9, 9]])
    query = torch.tensor([[0, 4, 4], [4, 4, 4], [0, 0, 4]])
    rollout = generate(policy, query, (query != 0).long(), torch.tensor([5, 4, 5]), eos_token_id=eos,
                       pad_token_id=pad)
    assert rollout.response_ids.tolist() == [[5, 6, eos, pad], [5, 6, 7, 8], [eos, pad, pad, pad]]
    assert rollout.response_mask.tolist() == [[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert rollout.ended_with(eos).tolist() == [True, False, True]


def test_inverse_transform_sampling_follows_the_distribution():
    probs = torch.tensor([[0.5, 0.0, 0.3, 0.2], [0.0, 0.0, 0.0, 1.0], [0.25, 0.25, 0.25, 0.25]])
    gen = torch.Generator().manual_seed(0)
    n = 20_000
    draws = torch.stack([sample_categorical(probs, gen) for _ in range(n)], 1)  # (3, n)
    freq = torch.stack([torch.bincount(row, minlength=4) for row in draws]).float() / n
    assert (draws[0] != 1).all() and (draws[1] == 3).all()  # zero probability: never drawn
    # Binomial standard error at n=20000 is at most 0.0036: 5 sigma is 0.018.
    assert_close(freq, probs, atol=0.018, rtol=0)


def test_cached_sampling_log_probs_equal_a_fresh_forward():
    module = _ready(_module())
    batch = _batch(module)
    with torch.no_grad():  # make the adapter non-trivial
        for name, p in module.policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    recorded = []

    def recording_policy(*args, **kwargs):
        out = module.policy(*args, **kwargs)
        recorded.append(out.logits[:, -1].log_softmax(-1))
        return out

    module.policy.eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        rollout = generate(recording_policy, batch["input_ids"], batch["attention_mask"], torch.full((8,), 6),
                           eos_token_id=module.tokenizer.eos_token_id, pad_token_id=module.tokenizer.pad_token_id,
                           generator=gen)
        fresh, _, _ = evaluate_actions(module.policy, rollout)
    steps = rollout.response_ids.size(1)
    cached = torch.stack([recorded[t].gather(-1, rollout.response_ids[:, t:t + 1]).squeeze(-1) for t in range(steps)], 1)
    mask = rollout.response_mask.bool()
    assert (batch["attention_mask"] == 0).any()  # the prompts really are left-padded
    torch.testing.assert_close(cached[mask], fresh[mask], atol=1e-5, rtol=1e-5)


def test_4bit_rollout_then_update_gives_exact_lora_gradients():
    """The CPU 4-bit hazard on a real cycle: rollout (eval, no grad) then a PPO backward."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as F
    from torch import nn

    module = _ready(_module(quantization="4bit-nf4", lora=LoraSettings(r=4, alpha=8, dropout=0.0)))
    with torch.no_grad():
        for name, p in module.policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    layers = {n: m for n, m in module.policy.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    dense = {n: F.dequantize_4bit(m.weight.data, m.weight.quant_state).float() for n, m in layers.items()}
    rollout = module.rollout(_batch(module), module.generator)
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
    trainer.fit(module, _data(module, batch=batch))
    return trainer


def test_short_fit_raises_the_score(tmp_path):
    scores = []
    # Full fine-tuning: LoRA leaves the random-init output layer as it is, which is slow to steer.
    module = _module(lora=None, batch=16, ppo=PPOConfig(mini_batch_size=8, ppo_epochs=4),
                     optim=OptimConfig(lr=3e-3, min_lr_ratio=1.0), kl=KLConfig(adaptive=False, init_coef=0.05))
    log_step = module._log_step
    module._log_step = lambda stats: (scores.append(float(stats["env/score"])), log_step(stats))
    _fit(module, tmp_path, rollouts=30, batch=16)
    first, last = sum(scores[:5]) / 5, sum(scores[-5:]) / 5
    assert last > 1.5 * first, scores
    saved = next(tmp_path.glob("lightning_logs/version_*/model"))
    assert (saved / "model.safetensors").is_file() and (saved / "value_head.safetensors").is_file()


def test_bf16_mixed_step_clips_gradients_with_a_fused_optimizer(tmp_path):
    module = _module(ppo=PPOConfig(mini_batch_size=4, ppo_epochs=1, max_grad_norm=1e-3))
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
    straight = _module()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=8, save_top_k=-1)
    _fit(straight, tmp_path / "a", rollouts=4, callbacks=[ckpt], logger=False)

    resumed = _module()
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=4, limit_val_batches=0,
                        default_root_dir=tmp_path / "b", enable_progress_bar=False, logger=False,
                        enable_checkpointing=False)
    trainer.fit(resumed, _data(resumed), ckpt_path=tmp_path / "ckpt" / "epoch=0-step=8.ckpt")

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
        _module(ppo=PPOConfig(mini_batch_size=3), batch=8)
    assert _module(ppo=PPOConfig(mini_batch_size=4), batch=8).ppo.mini_batch_size == 4


def test_bad_sampling_and_ppo_settings():
    with pytest.raises(ValueError, match="min_new_tokens <= max_new_tokens, got 9 > 4"):
        SamplingConfig(min_new_tokens=9, max_new_tokens=4)
    with pytest.raises(ValueError, match="gradient_accumulation_steps=3 does not divide"):
        PPOConfig(mini_batch_size=8, gradient_accumulation_steps=3)


def test_reward_returning_nan_stops_with_a_message(tmp_path):
    module = _module(reward=BrokenReward("nan"))
    with pytest.raises(NonFiniteLossError, match="8 non-finite score"):
        _fit(module, tmp_path, rollouts=1, logger=False)


def test_reward_of_the_wrong_shape_is_named(tmp_path):
    module = _module(reward=BrokenReward("shape"))
    with pytest.raises(ValueError, match=r"reward function returned shape \(8, 2\); expected \(8,\)"):
        _fit(module, tmp_path, rollouts=1, logger=False)


def test_long_prompts_are_filtered_and_counted():
    module = _module()
    dm = _data(module, max_prompt_length=4)
    dm.setup("fit")
    assert dm.stats["train_too_long"] > 0 and dm.stats["train_prompts"] > 0
    assert all(len(ids) <= 4 for _, ids in dm.train_prompts)
    with pytest.raises(ValueError, match="no prompt fits max_prompt_length=1"):
        bad = _data(module, max_prompt_length=1)
        bad.setup("fit")


def test_prompt_stream_resumes_and_splits_ranks():
    from lit_rlhf.data.prompts import PromptStream

    prompts = [(f"p{i}", [1, i + 2]) for i in range(40)]
    stream = PromptStream(prompts, batch_size=4, pad_id=0, seed=1, start=3)
    first = next(iter(stream))
    assert first["index"] == 3 and first["prompt"] == PromptStream(prompts, 4, 0, seed=1).batch(3)["prompt"]
    # Two ranks: disjoint slices of the same global batch.
    rank0, rank1 = (PromptStream(prompts, 4, 0, seed=1) for _ in range(2))
    rank0._rank_world = lambda: (0, 2)
    rank1._rank_world = lambda: (1, 2)
    a, b = rank0.batch(2)["prompt"], rank1.batch(2)["prompt"]
    assert len(a) == len(b) == 4 and not set(a) & set(b)


DDP_SCRIPT = """
import sys, torch, lightning as L
sys.path.insert(0, {root!r})
from tests.test_ppo import _module, _data
module = _module()
trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=1, limit_train_batches=3,
                    limit_val_batches=0, default_root_dir={out!r}, enable_progress_bar=False, logger=False,
                    enable_checkpointing=False)
trainer.fit(module, _data(module))
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
