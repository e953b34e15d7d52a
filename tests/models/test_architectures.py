"""The architecture matrix: tiny random-init models of many families through the parts that
differ between model files (attention masks, dropout, attention implementations, LoRA targets).

Each family is 2 layers of width 64 with its vocabulary from the demo tokenizer. Dropout
fields are set to 0.1 wherever the family has them, so that "dropout off" is really tested.
"""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from transformers import AutoModelForSequenceClassification

from lit_rlhf.data import ConstantLengthDataset
from lit_rlhf.data.preference import Pair, collate_pairs, pack_pairs
from lit_rlhf.export import merge_adapter
from lit_rlhf.models.heads import unwrap_peft
from lit_rlhf.models import LoraSettings, ModelConfig, load_model, save_pretrained_atomic
from lit_rlhf.models.loading import dropout_fields
from lit_rlhf.modules import DPOModule, GRPOModule, PPOModule, RewardModule, SFTModule
from lit_rlhf.modules.grpo import GRPOConfig
from lit_rlhf.modules.ppo import PPOConfig, SamplingConfig
from lit_rlhf.modules.rollout import evaluate_actions, generate
from lit_rlhf.objectives import causal_lm_loss
from lit_rlhf.objectives.logprobs import logprobs_from_logits
from tests.modules.ppo_helpers import LetterReward, make_data

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
# Families without a sequence-classification class in transformers: refused as reward models.
NO_SEQ_CLS = {"granite"}


def arch(family: str) -> dict:
    return {"model_type": family, **FAMILIES[family]}


def _lm(family: str, **kwargs) -> ModelConfig:
    return ModelConfig(arch=arch(family), tokenizer="demo", **kwargs)


def chunk_labels(ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Labels as ConstantLengthDataset makes them: the tokens, -100 at each inner document start."""
    return torch.where((pos == 0) & (torch.arange(len(ids)) > 0), -100, ids)


def _packed_chunk(tokenizer):
    texts = ["The first review is short.", "A second review, a little longer than the first one was.",
             "Third: the acting is fine.", "And a fourth one to fill the chunk up."] * 4
    chunk = next(iter(ConstantLengthDataset([{"text": t} for t in texts], tokenizer, seq_length=48)))
    ids, pos = chunk["input_ids"], chunk["position_ids"]
    starts = (pos == 0).nonzero().flatten().tolist()
    start, end = starts[1], starts[2]  # the second document lies wholly inside the chunk
    assert 0 < start < end - 3
    return ids, pos, start, end


@pytest.mark.parametrize("targets", [None, "all-linear"], ids=["default-targets", "all-linear"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_sft_keeps_packed_documents_apart_and_trains_with_lora(family, targets):
    if family in UNPACKABLE:
        with pytest.raises(ValueError, match=f"packed SFT cannot keep documents apart.*{UNPACKABLE[family]}"):
            SFTModule(_lm(family), seq_length=48)
        return
    module = SFTModule(_lm(family, lora=LoraSettings(r=4, alpha=8, dropout=0.0, target_modules=targets)),
                       seq_length=48)
    module.configure_model()
    # sdpa where the model class supports it, else eager (Gemma2: eager from transformers 5.20 on).
    expected = "sdpa" if getattr(type(unwrap_peft(module.model)), "_supports_sdpa", False) else "eager"
    assert module.model.config._attn_implementation == expected
    ids, pos, start, end = _packed_chunk(module.tokenizer)
    # 1. isolation: a document's logits inside the chunk equal its logits alone.
    module.eval()
    with torch.no_grad():
        packed = module(ids[None], pos[None])[0, start:end]
        alone = module(ids[None, start:end], pos[None, start:end])[0]
        leaky = module.model(input_ids=ids[None], use_cache=False).logits[0, start:end]
    torch.testing.assert_close(packed, alone, atol=2e-5, rtol=1e-4)
    assert not torch.allclose(leaky, alone, atol=1e-3, rtol=1e-3)  # control: plain causal leaks
    # 2. optimizer steps on the packed chunk with the LoRA targets (peft's default, or all-linear
    #    where peft has none).
    module.train()
    adapters = [p for n, p in module.named_parameters() if p.requires_grad]
    assert adapters and all("lora_" in n for n, p in module.named_parameters() if p.requires_grad)
    optimizer = torch.optim.AdamW(adapters, lr=1e-2)
    losses = []
    for _ in range(3):
        loss = causal_lm_loss(module(ids[None], pos[None]), chunk_labels(ids, pos)[None]).loss
        losses.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert all(math.isfinite(v) for v in losses) and losses[2] < losses[0]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_reward_model_packs_trains_exports_and_reloads_with_the_same_scores(family, tmp_path):
    if family in NO_SEQ_CLS:
        with pytest.raises(ValueError, match="no sequence-classification"):
            RewardModule(_lm(family))
        return
    module = RewardModule(_lm(family, lora=LoraSettings(r=4, alpha=8, dropout=0.0, target_modules="all-linear")))
    module.configure_model()
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(3, 500, (n,), generator=g).tolist() for n in (5, 11, 7, 9)]
    pairs = [(seqs[0], seqs[2], 0.0), (seqs[1], seqs[3], 0.0)]
    pad = module.tokenizer.pad_token_id
    packed, padded = pack_pairs(pairs, pad), collate_pairs(pairs, pad)
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):  # two steps, so the exported adapter and score head are not the init
        stats, _, _ = module._pair_step(packed)
        optimizer.zero_grad()
        stats.loss.backward()
        optimizer.step()
    module.eval()
    with torch.no_grad():
        scores_packed = module.forward_packed(packed["input_ids"], packed["position_ids"], packed["lengths"])
        scores_padded = module(padded["input_ids"], padded["attention_mask"])
    torch.testing.assert_close(scores_packed, scores_padded, atol=2e-5, rtol=1e-4)  # no leak between sequences
    save_pretrained_atomic(module.model, tmp_path / "adapter", module.tokenizer)
    export = merge_adapter(module.lm_config, tmp_path / "adapter", tmp_path / "export",
                           tokenizer=module.tokenizer, task="seq_cls")
    reloaded = AutoModelForSequenceClassification.from_pretrained(export).eval()
    with torch.no_grad():
        scores_reloaded = reloaded(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits[:, 0]
    torch.testing.assert_close(scores_reloaded, scores_padded, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("quantization", ["8bit", "4bit-nf4"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_quantized_base_loads_and_takes_an_sft_step(family, quantization, tokenizer):
    model = load_model(_lm(family, quantization=quantization,
                           lora=LoraSettings(r=4, alpha=8, dropout=0.0, target_modules="all-linear")), tokenizer)
    ids = torch.randint(3, 100, (2, 12))
    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert math.isfinite(loss.item()) and lora_b and all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora_b)
    torch.optim.SGD(lora_b, lr=0.1).step()
    assert all(p.abs().sum() > 0 for p in lora_b)  # the adapter moved off its zero init


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_ppo_runs_two_rollouts_and_its_first_minibatch_has_ratio_exactly_one(family, tmp_path):
    lm = _lm(family, lora=LoraSettings(r=4, alpha=8, dropout=0.1, target_modules="all-linear"))
    assert dropout_fields(_config(family)), "the family should have dropout fields to switch off"
    module = PPOModule(lm, LetterReward(), ppo=PPOConfig(mini_batch_size=4, ppo_epochs=1),
                       sampling=SamplingConfig(min_new_tokens=2, max_new_tokens=4), rollout_batch_size=4)
    seen = []
    loss = module.loss
    def recording_loss(*args):  # a copy of every minibatch's statistics (the update loop pops some)
        value, stats = loss(*args)
        seen.append((value.detach(), dict(stats)))
        return value, stats

    module.loss = recording_loss
    trainer = L.Trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=0, accelerator="cpu",
                        default_root_dir=tmp_path, logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False)
    trainer.fit(module, make_data(module, 4))
    assert dropout_fields(module.policy.base_model.config) == []  # config dropout off ...
    assert module.rollouts_done == 2 and len(seen) == 2
    first = seen[0][1]  # ... so the first update forward reproduces the rollout exactly
    assert first["ratio_mean"].item() == 1.0 and first["ratio_max"].item() == 1.0
    assert first["approx_kl"].item() == 0.0
    assert math.isfinite(seen[1][0].item())


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_grpo_groups_share_their_prompt_pass_and_start_at_the_reference(family):
    # GRPO scores each group's prompt once (its KV cache indexed out to the group's
    # responses): the same log-probs as the full forward, and at step 0 (LoRA B = 0) the
    # policy's equal the reference's (adapters off) exactly: ratio 1, KL 0.
    lm = _lm(family, lora=LoraSettings(r=4, alpha=8, dropout=0.1, target_modules="all-linear"))
    module = GRPOModule(lm, LetterReward(), grpo=GRPOConfig(num_generations=3), rollout_batch_size=2)
    module.configure_model()
    tok = module.tokenizer
    query = torch.tensor([[tok.pad_token_id, 40, 41, 42], [50, 51, 52, 53]])
    module.policy.eval()
    with torch.no_grad():
        rollout = generate(module.policy, query, (query != tok.pad_token_id).long(), torch.tensor([3, 5, 4, 5, 2, 5]),
                           eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                           generator=torch.Generator().manual_seed(0), num_generations=3)
        full = evaluate_actions(module.policy, rollout, with_values=False)[0]
        reference = module.reference_logprobs(rollout)
    module.policy.train()  # as in the update: LoRA dropout is live (p = 0), gradients on
    shared = evaluate_actions(module.policy, rollout, with_values=False, share_prompts=True)[0]
    mask = rollout.response_mask.bool()
    torch.testing.assert_close(shared[mask], full[mask], atol=1e-4, rtol=1e-5)
    assert torch.equal(shared.detach(), reference)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_dpo_packed_log_probs_equal_each_sequence_alone_and_start_at_the_reference(family):
    lm = _lm(family, lora=LoraSettings(r=4, alpha=8, dropout=0.1, target_modules="all-linear"))
    if family in UNPACKABLE:
        with pytest.raises(ValueError, match=UNPACKABLE[family]):
            DPOModule(lm)
        return
    module = DPOModule(lm)
    module.configure_model()
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, 500, (4,), generator=g).tolist()
    sides = [prompt + torch.randint(3, 500, (n,), generator=g).tolist() for n in (5, 9, 3, 7)]
    pairs = [Pair(sides[0], sides[2], 0.0, len(prompt)), Pair(sides[1], sides[3], 0.0, len(prompt))]
    batch = pack_pairs(pairs, 0)
    module.train()  # LoRA dropout is on in the policy pass, the base model's is off
    module.model.eval()
    with torch.no_grad():
        packed, counts = module.sequence_logps(module.model, batch)
        alone = []
        for seq in [p.chosen for p in pairs] + [p.rejected for p in pairs]:
            ids = torch.tensor([seq])
            logits = module.model(input_ids=ids, use_cache=False).logits  # every position, the model's own head
            alone.append(logprobs_from_logits(logits[:, :-1], ids[:, 1:])[0, len(prompt) - 1:].sum())
        torch.testing.assert_close(packed, torch.stack(alone), atol=1e-4, rtol=1e-5)  # no leak between sequences
        assert counts.tolist() == [5, 9, 3, 7]
        module.model.train()
        out = module._step(batch)  # zero-initialised LoRA B: the policy is the reference, exactly
    assert torch.equal(module.sequence_logps(module.model, batch)[0], module.reference_logps(batch))
    assert out["loss"].item() == pytest.approx(math.log(2), abs=1e-7) and out["rewards/margin"].item() == 0.0


@pytest.mark.parametrize("family", ["gemma2", "mistral"])
def test_dpo_on_eager_or_sliding_window_models_scores_padded_rows(family, monkeypatch):
    # Gemma2 must use eager attention; Mistral's sliding window keeps it off segment attention.
    # A block mask over the packed row would be quadratic in its length and would let the
    # window-4 layers see whole sequences: DPO falls back to padded rows, as the reward model does.
    import lit_rlhf.models.attention as attention

    def no_block_mask(*args, **kwargs):
        raise AssertionError("a block mask over the whole packed row")

    module = DPOModule(ModelConfig(arch={**arch(family), "sliding_window": 4}, tokenizer="demo"))
    module.configure_model()
    monkeypatch.setattr(attention, "packed_causal_mask", no_block_mask)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, 500, (4,), generator=g).tolist()
    sides = [prompt + torch.randint(3, 500, (n,), generator=g).tolist() for n in (5, 9, 3, 7)]
    pairs = [Pair(sides[0], sides[2], 0.0, len(prompt)), Pair(sides[1], sides[3], 0.0, len(prompt))]
    module.eval()
    with torch.no_grad():
        packed, counts = module.sequence_logps(module.model, pack_pairs(pairs, 0))
        alone = []
        for seq in [p.chosen for p in pairs] + [p.rejected for p in pairs]:
            ids = torch.tensor([seq])
            logits = module.model(input_ids=ids, use_cache=False).logits  # the model's own (windowed) masks
            alone.append(logprobs_from_logits(logits[:, :-1], ids[:, 1:])[0, len(prompt) - 1:].sum())
    torch.testing.assert_close(packed, torch.stack(alone), atol=1e-4, rtol=1e-5)
    assert counts.tolist() == [5, 9, 3, 7]


def test_unsupported_attention_is_refused_before_loading(tokenizer):
    from lit_rlhf.models.loading import attention_for

    # BLOOM has no sdpa in any transformers version we support (Gemma2 gained it back in 5.16-5.19).
    with pytest.raises(ValueError, match="attn_implementation='sdpa': BloomForCausalLM supports eager"):
        attention_for(_lm("bloom", attn_implementation="sdpa"), _config("bloom"))


def _config(family: str):
    from transformers import AutoConfig

    fields = arch(family)
    return AutoConfig.for_model(fields.pop("model_type"), **fields)


def test_sliding_window_shorter_than_the_chunk_is_refused_and_a_longer_one_accepted():
    windowed = {**arch("mistral"), "sliding_window": 16}
    with pytest.raises(ValueError, match="sliding-window layers \\(window 16\\).*seq_length <= 16"):
        SFTModule(ModelConfig(arch=windowed, tokenizer="demo"), seq_length=48)
    SFTModule(ModelConfig(arch=windowed, tokenizer="demo"), seq_length=16)  # within the window: exact
