"""A reward model as a second adapter on the policy's base (AdapterReward): same scores as the
reward model on its own, nothing of it trained or saved with the policy, and a base mismatch
refused before any weights load."""

from __future__ import annotations

import json

import pytest
import torch

from lit_rlhf.export import merge_adapter
from lit_rlhf.models import (
    LoraSettings,
    ModelConfig,
    disable_cpu_4bit_repacking,
    load_model,
    load_tokenizer,
)
from lit_rlhf.models.adapters import adapter_active, base_identity
from lit_rlhf.modules import GRPOModule, PPOModule
from lit_rlhf.modules.grpo import GRPOConfig
from lit_rlhf.modules.ppo import PPOConfig, SamplingConfig
from lit_rlhf.rewards import AdapterReward, RewardModelReward
from tests.conftest import TINY_LLAMA

TEXTS = ["the film was", "a quiet lighthouse keeper and a long winter, told slowly", "good", "x y z w"]
ENDINGS = [" wonderful", " and nothing else happens", " enough", ""]
POLICY_LORA = LoraSettings(r=4, alpha=8, dropout=0.0, target_modules="all-linear")


@pytest.fixture(scope="module")
def rm(tmp_path_factory):
    """A base causal LM on disk, a reward adapter trained on it (random non-zero LoRA B and
    score head: an untrained adapter would equal the base), and its merged export."""
    root = tmp_path_factory.mktemp("adapter_rm")
    tokenizer = load_tokenizer("demo")
    base = load_model(ModelConfig(arch=TINY_LLAMA, tokenizer="demo"), tokenizer)
    base.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    rm_cfg = ModelConfig(name_or_path=str(root / "base"), lora=LoraSettings(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    model = load_model(rm_cfg, tokenizer, task="seq_cls", new_head=True)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "score" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    model.save_pretrained(root / "adapter")
    tokenizer.save_pretrained(root / "adapter")
    (root / "adapter" / "lit_rlhf.json").write_text(json.dumps({"base": base_identity(rm_cfg)}))
    merge_adapter(rm_cfg, root / "adapter", root / "merged", tokenizer=tokenizer, task="seq_cls")
    return root


def _policy(rm, quantization="none", dtype="float32", reward=None, module=PPOModule, **kwargs):
    lm = ModelConfig(name_or_path=str(rm / "base"), lora=POLICY_LORA, quantization=quantization, dtype=dtype)
    reward = reward or AdapterReward(str(rm / "adapter"), normalize=False, batch_size=3)
    if module is GRPOModule:
        kwargs.setdefault("grpo", GRPOConfig(num_generations=2, mini_batch_size=4))
    else:
        kwargs.setdefault("ppo", PPOConfig(mini_batch_size=4, ppo_epochs=1))
    policy = module(lm, reward, sampling=SamplingConfig(min_new_tokens=2, max_new_tokens=4),
                    rollout_batch_size=4, **kwargs)
    policy.configure_model()
    return policy, reward


def test_scores_equal_the_merged_reward_model_and_leave_the_policy_untouched(rm):
    policy, reward = _policy(rm)
    lm = policy.policy.lm
    ids = torch.tensor([[5, 9, 13, 2, 7]])
    flags = {n: p.requires_grad for n, p in lm.named_parameters()}
    logits = lm(input_ids=ids).logits
    scores = reward(TEXTS, ENDINGS)
    merged = RewardModelReward(str(rm / "merged"), normalize=False, batch_size=3)(TEXTS, ENDINGS)
    assert scores.shape == (4,) and scores.std() > 0
    torch.testing.assert_close(scores, merged, atol=1e-5, rtol=1e-5)
    # After scoring: the policy's adapter is active again, its flags unchanged, its logits the same.
    assert lm.active_adapter == "default"
    assert {n: p.requires_grad for n, p in lm.named_parameters()} == flags
    assert torch.equal(lm(input_ids=ids).logits, logits)
    # The reward adapter is frozen: not in the optimizer, not in a checkpoint of trainable weights.
    assert not any(p.requires_grad for n, p in lm.named_parameters() if ".reward." in n)
    assert any(".reward." in n for n, _ in lm.named_parameters())
    assert not any(".reward." in k for k in policy.checkpoint_keys())


def test_4bit_scores_equal_the_reward_model_loaded_separately_in_4bit(rm):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, BitsAndBytesConfig

    policy, reward = _policy(rm, quantization="4bit-nf4")
    scores = reward(TEXTS, ENDINGS)
    # The same reward model as a second, separate 4-bit model (what TRL holds): base + its adapter.
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32)
    base = AutoModelForSequenceClassification.from_pretrained(rm / "base", num_labels=1, quantization_config=quant,
                                                              device_map={"": "cpu"}, dtype=torch.float32)
    base.config.pad_token_id = reward._tokenizer.pad_token_id
    separate = PeftModel.from_pretrained(base, str(rm / "adapter")).eval()
    # On a CPU with AVX512-BF16 the first no-grad forward would repack its 4-bit weights into
    # another kernel's layout (see disable_cpu_4bit_repacking): compare the same kernels.
    disable_cpu_4bit_repacking(separate)
    enc = reward._tokenizer([t + e for t, e in zip(TEXTS, ENDINGS)], return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = separate(**enc).logits[:, 0]
    assert scores.std() > 0
    torch.testing.assert_close(scores, expected, atol=1e-4, rtol=1e-4)
    # And close to the full-precision merged model: 4-bit rounding only.
    merged = RewardModelReward(str(rm / "merged"), normalize=False)(TEXTS, ENDINGS)
    assert torch.corrcoef(torch.stack([scores, merged]))[0, 1] > 0.9


def test_grpo_accepts_the_adapter_reward_and_exports_only_its_own_adapter(rm, tmp_path):
    import lightning as L

    from tests.modules.ppo_helpers import make_data

    lm = ModelConfig(name_or_path=str(rm / "base"), lora=POLICY_LORA)
    module = GRPOModule(lm, AdapterReward(str(rm / "adapter"), normalize=False),
                        sampling=SamplingConfig(min_new_tokens=2, max_new_tokens=4),
                        grpo=GRPOConfig(num_generations=2, mini_batch_size=8), rollout_batch_size=4)
    trainer = L.Trainer(default_root_dir=tmp_path, max_epochs=1, limit_train_batches=2, limit_val_batches=0,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, make_data(module, batch=4))
    assert trainer.global_step == 2
    assert module.policy.lm.active_adapter == "default"
    saved = sorted(p.name for p in (tmp_path / "adapter").iterdir())
    assert "adapter_model.safetensors" in saved and "reward" not in saved
    from safetensors.torch import load_file

    assert not any(".reward." in k for k in load_file(tmp_path / "adapter" / "adapter_model.safetensors"))


def test_adapter_active_restores_the_previous_adapter_and_flags(rm):
    policy, _ = _policy(rm)
    lm = policy.policy.lm
    before = {n: p.requires_grad for n, p in lm.named_parameters()}
    with pytest.raises(RuntimeError, match="inside"):
        with adapter_active(lm, "reward"):
            assert lm.active_adapter == "reward"
            raise RuntimeError("inside")
    assert lm.active_adapter == "default"
    assert {n: p.requires_grad for n, p in lm.named_parameters()} == before


def test_another_base_is_refused_at_construction(rm, tmp_path):
    # Same architecture, another seed: the weights differ, so the adapter does not fit.
    other = ModelConfig(arch=TINY_LLAMA, tokenizer="demo", lora=POLICY_LORA, seed=7)
    reward = AdapterReward(str(rm / "adapter"))
    with pytest.raises(ValueError, match="was trained on the base .*but the policy's base is"):
        PPOModule(other, reward, rollout_batch_size=4, ppo=PPOConfig(mini_batch_size=4))
    # The same base given by another spelling of its path is accepted.
    same = ModelConfig(name_or_path=str(rm / "base" / ".." / "base"), lora=POLICY_LORA)
    PPOModule(same, reward, rollout_batch_size=4, ppo=PPOConfig(mini_batch_size=4))
    # check_base=False trusts the user (the weight shapes are still checked when it loads).
    PPOModule(other, AdapterReward(str(rm / "adapter"), check_base=False), rollout_batch_size=4,
              ppo=PPOConfig(mini_batch_size=4))


def test_a_full_fine_tuning_policy_is_refused(rm):
    lm = ModelConfig(name_or_path=str(rm / "base"))
    with pytest.raises(ValueError, match="needs LoRA"):
        PPOModule(lm, AdapterReward(str(rm / "adapter")), rollout_batch_size=4, ppo=PPOConfig(mini_batch_size=4))


def test_bad_adapter_folders_fail_in_one_line(rm, tmp_path):
    with pytest.raises(FileNotFoundError, match="no adapter_config.json"):
        AdapterReward(str(tmp_path / "missing"))
    # A causal-LM adapter (a policy's, not a reward model's).
    policy, _ = _policy(rm)
    policy.policy.lm.save_pretrained(tmp_path / "policy_adapter", selected_adapters=["default"])
    with pytest.raises(ValueError, match="CAUSAL_LM adapter; a reward adapter is a LoRA SEQ_CLS"):
        AdapterReward(str(tmp_path / "policy_adapter"))


def test_an_adapter_of_another_shape_is_refused_when_it_loads(rm):
    wide = dict(TINY_LLAMA, hidden_size=96)
    lm = ModelConfig(arch=wide, tokenizer="demo", lora=POLICY_LORA)
    module = PPOModule(lm, AdapterReward(str(rm / "adapter"), check_base=False), rollout_batch_size=4,
                       ppo=PPOConfig(mini_batch_size=4))
    with pytest.raises(ValueError, match="does not fit the policy's base"):
        module.configure_model()


def test_the_rm_stage_writes_an_adapter_that_ppo_serves_from_its_base(rm, cli, tmp_path):
    # RM stage with LoRA on the base -> <run>/adapter with the base recorded; PPO on the same
    # base scores with it (config: reward: {class_path: AdapterReward, init_args: {adapter: ...}}).
    base = str(rm / "base")
    out = cli.run(["fit", "-c", "configs/rm/demo.yaml", f"--trainer.default_root_dir={tmp_path / 'rm'}",
                   "--trainer.max_steps=2", "--data.init_args.max_train_pairs=16", "--model.init_args.lm.arch=null",
                   f"--model.init_args.lm.name_or_path={base}", "--model.init_args.lm.lora={r: 4, target_modules: all-linear}"])
    assert out.code == 0, out.stderr[-3000:]
    adapter = tmp_path / "rm" / "lightning_logs" / "version_0" / "adapter"
    meta = json.loads((adapter / "lit_rlhf.json").read_text())
    assert meta["base"] == {"name_or_path": str((rm / "base").resolve()), "revision": None}
    assert {"reward_mean", "reward_std"} <= set(meta)
    ppo = ["fit", "-c", "configs/ppo/demo.yaml", f"--trainer.default_root_dir={tmp_path / 'ppo'}",
           f"--model.init_args.lm.name_or_path={base}", "--model.init_args.reward=lit_rlhf.rewards.AdapterReward",
           f"--model.init_args.reward.adapter={adapter}", "--model.init_args.judge=null",
           "--data.init_args.batch_size=8", "--model.init_args.ppo.mini_batch_size=8", "--trainer.max_steps=4",
           "--trainer.limit_val_batches=0"]
    out = cli.run(ppo)
    assert out.code == 0, out.stderr[-3000:]
    exported = tmp_path / "ppo" / "lightning_logs" / "version_0" / "adapter"
    assert (exported / "adapter_model.safetensors").is_file() and not (exported / "reward").exists()
    # Another base: one line, exit 2, before any weights load.
    out = cli.run([*ppo[:4], "--model.init_args.lm.name_or_path=null", "--model.init_args.lm.arch=demo-tiny",
                   "--model.init_args.lm.tokenizer=demo", *ppo[5:]])
    last = out.stderr.strip().splitlines()[-1]
    assert out.code == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert last.startswith("error: ") and "was trained on the base" in last, out.stderr[-2000:]


def test_a_separate_reward_model_loads_in_4bit(rm):
    import bitsandbytes as bnb

    full = RewardModelReward(str(rm / "merged"), normalize=False)
    nf4 = RewardModelReward(str(rm / "merged"), normalize=False, quantization="4bit-nf4")
    scores, expected = nf4(TEXTS, ENDINGS), full(TEXTS, ENDINGS)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in nf4._model.modules())
    assert not torch.equal(scores, expected)  # rounded to 4 bits ...
    assert torch.corrcoef(torch.stack([scores, expected]))[0, 1] > 0.9  # ... but the same model
    with pytest.raises(ValueError, match="reward quantization must be"):
        RewardModelReward(str(rm / "merged"), quantization="nf4")
