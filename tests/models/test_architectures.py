"""The architecture matrix: tiny random-init models of many families through the parts that
differ between model files (attention masks, dropout, attention implementations, LoRA targets).

Each family is 2 layers of width 64 with its vocabulary from the demo tokenizer. Dropout
fields are set to 0.1 wherever the family has them, so that "dropout off" is really tested.
"""

from __future__ import annotations

import pytest
import torch

from lit_rlhf.data import ConstantLengthDataset
from lit_rlhf.models import LoraSettings, ModelConfig, load_model
from lit_rlhf.models.loading import dropout_fields
from lit_rlhf.modules import PPOModule, SFTModule
from lit_rlhf.modules.ppo import PPOConfig, SamplingConfig
from lit_rlhf.modules.rollout import evaluate_actions
from tests.modules.ppo_helpers import LetterReward, make_batch

_LLAMA_LIKE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=256, attention_dropout=0.1)
FAMILIES: dict[str, dict] = {
    "gpt2": dict(n_embd=64, n_layer=2, n_head=4, n_positions=256, resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1),
    "gpt_neox": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     max_position_embeddings=256, attention_dropout=0.1, hidden_dropout=0.1),
    "opt": dict(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4, word_embed_proj_dim=64,
                max_position_embeddings=256, dropout=0.1, attention_dropout=0.1),
    "bloom": dict(hidden_size=64, n_layer=2, n_head=4, attention_dropout=0.1, hidden_dropout=0.1),
    "falcon": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, attention_dropout=0.1, hidden_dropout=0.1),
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": dict(_LLAMA_LIKE, head_dim=16),
    "phi": dict(_LLAMA_LIKE, resid_pdrop=0.1, embd_pdrop=0.1),
    "phi3": dict(_LLAMA_LIKE, resid_pdrop=0.1, embd_pdrop=0.1),
    "gemma2": dict(_LLAMA_LIKE, head_dim=16),
    "gemma3_text": dict(_LLAMA_LIKE, head_dim=16),
    "olmo2": _LLAMA_LIKE,
    "olmo3": _LLAMA_LIKE,
    "granite": _LLAMA_LIKE,
    "smollm3": _LLAMA_LIKE,
}
# Families whose documents cannot be kept apart inside a packed chunk: refused, with the reason.
UNPACKABLE = {"bloom": "ALiBi"}


def arch(family: str) -> dict:
    return {"model_type": family, **FAMILIES[family]}


def _lm(family: str, **kwargs) -> ModelConfig:
    return ModelConfig(arch=arch(family), tokenizer="demo", **kwargs)


def _packed_chunk(tokenizer):
    texts = ["The first review is short.", "A second review, a little longer than the first one was.",
             "Third: the acting is fine.", "And a fourth one to fill the chunk up."] * 4
    chunk = next(iter(ConstantLengthDataset([{"text": t} for t in texts], tokenizer, seq_length=48)))
    ids, pos = chunk["input_ids"], chunk["position_ids"]
    starts = (pos == 0).nonzero().flatten().tolist()
    start, end = starts[1], starts[2]  # the second document lies wholly inside the chunk
    assert 0 < start < end - 3
    return ids, pos, start, end


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_packed_sft_keeps_documents_apart(family, tokenizer):
    if family in UNPACKABLE:
        with pytest.raises(ValueError, match=f"packed SFT cannot keep documents apart.*{UNPACKABLE[family]}"):
            SFTModule(_lm(family), seq_length=48)
        return
    module = SFTModule(_lm(family, lora=LoraSettings(r=4, alpha=8, dropout=0.0)), seq_length=48)
    module.configure_model()
    module.eval()
    ids, pos, start, end = _packed_chunk(module.tokenizer)
    with torch.no_grad():
        packed = module(ids[None], pos[None])[0, start:end]
        alone = module(ids[None, start:end], pos[None, start:end])[0]
        leaky = module.model(input_ids=ids[None], use_cache=False).logits[0, start:end]
    torch.testing.assert_close(packed, alone, atol=2e-5, rtol=1e-4)
    assert not torch.allclose(leaky, alone, atol=1e-3, rtol=1e-3)  # control: plain causal leaks


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_first_on_policy_ppo_minibatch_has_ratio_exactly_one(family):
    lm = _lm(family, lora=LoraSettings(r=4, alpha=8, dropout=0.1, target_modules="all-linear"))
    assert dropout_fields(_config(family)), "the family should have dropout fields to switch off"
    module = PPOModule(lm, LetterReward(), ppo=PPOConfig(mini_batch_size=4, ppo_epochs=1),
                       sampling=SamplingConfig(min_new_tokens=3, max_new_tokens=6), rollout_batch_size=4)
    module.configure_model()
    assert dropout_fields(module.policy.base_model.config) == []
    rollout = module.rollout(make_batch(module, 4), module.generator)
    assert torch.equal(rollout.logprobs, rollout.ref_logprobs)  # LoRA B = 0: policy == reference
    module.policy.train()  # the update runs in train mode: dropout would show here
    logprobs, _, _ = evaluate_actions(module.policy, rollout)
    assert torch.equal(logprobs, rollout.logprobs)  # ratio exactly 1


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_default_attention_and_lora_targets_load(family, tokenizer):
    model = load_model(_lm(family, lora=LoraSettings(r=4, alpha=8)), tokenizer)
    expected = "eager" if family in ("bloom", "gemma2") else "sdpa"
    assert model.config._attn_implementation == expected
    adapted = [n for n, p in model.named_parameters() if p.requires_grad and "lora_" in n]
    assert adapted, "LoRA found no target modules"
    ids = torch.randint(3, 100, (2, 12))
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad and "lora_B" in n)


def test_unsupported_attention_is_refused_before_loading(tokenizer):
    with pytest.raises(ValueError, match="attn_implementation='sdpa': Gemma2ForCausalLM supports eager"):
        SFTModule(_lm("gemma2", attn_implementation="sdpa"))


def _config(family: str):
    from transformers import AutoConfig

    fields = arch(family)
    return AutoConfig.for_model(fields.pop("model_type"), **fields)
