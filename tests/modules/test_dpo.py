"""DPOModule: exact invariants at step 0, packed log-probs equal per-sequence ones, it learns."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch

from lit_rlhf.data import PreferenceDataModule
from lit_rlhf.data.preference import Pair, pack_pairs
from lit_rlhf.models import LoraSettings, ModelConfig
from lit_rlhf.modules import DPOModule
from lit_rlhf.objectives.logprobs import logprobs_from_logits
from lit_rlhf.optim import OptimConfig
from tests.conftest import TINY_LLAMA

LORA = LoraSettings(r=8, alpha=16, dropout=0.0, target_modules="all-linear")


def _module(lora=LORA, **kwargs):
    return DPOModule(ModelConfig(arch=TINY_LLAMA, tokenizer="demo", lora=lora), **kwargs)


def _ready(module):
    module.configure_model()
    return module


def _batch(tokenizer):
    texts = [("Review: a film", " that was wonderful.", " that was awful, really."),
             ("Review: the plot", " moves and delights", " drags")]
    pairs = []
    for prompt, good, bad in texts:
        p, g, b = (tokenizer(t)["input_ids"] for t in (prompt, good, bad))
        pairs.append(Pair(p + g, p + b, 0.0, len(p)))
    return pairs, pack_pairs(pairs, tokenizer.pad_token_id)


def test_packed_log_probs_equal_each_sequence_scored_alone():
    module = _ready(_module(lora=None))
    pairs, batch = _batch(module.tokenizer)
    got, counts = module.sequence_logps(module.model, batch)
    want, n = [], []
    for seq, prompt in [(p.chosen, p.prompt_length) for p in pairs] + [(p.rejected, p.prompt_length) for p in pairs]:
        ids = torch.tensor([seq])
        logits = module.model(input_ids=ids).logits
        lp = logprobs_from_logits(logits[:, :-1], ids[:, 1:])[0]
        want.append(lp[prompt - 1:].sum().item())  # tokens prompt.. predicted from prompt-1..
        n.append(len(seq) - prompt)
    assert got.tolist() == pytest.approx(want, abs=1e-4)
    assert counts.tolist() == n


@pytest.mark.parametrize("lora", [LORA, None], ids=["lora-adapters-off", "full-frozen-copy"])
def test_at_step_zero_the_policy_is_the_reference(lora):
    # LoRA B starts at zero: adapters on or off give the same log-probs, bit for bit; a frozen
    # copy of the starting model likewise. So the margin is 0, the loss log 2, rewards 0.
    module = _ready(_module(lora=lora))
    _, batch = _batch(module.tokenizer)
    out = module._step(batch)
    assert torch.equal(module.sequence_logps(module.model, batch)[0], module.reference_logps(batch))
    assert out["loss"].item() == pytest.approx(math.log(2), abs=1e-7)
    assert out["rewards/chosen"].item() == 0.0 and out["rewards/margin"].item() == 0.0
    assert out["rewards/accuracy"].item() == 0.0  # ties count as wrong


def test_length_normalized_scores_are_mean_token_log_probs():
    module = _ready(_module(lora=None, length_normalize=True))
    _, batch = _batch(module.tokenizer)
    sums, counts = module.sequence_logps(module.model, batch)
    out = module._step(batch)
    assert out["logps/chosen"].item() == pytest.approx((sums / counts).chunk(2)[0].mean().item(), rel=1e-6)
    assert out["loss"].item() == pytest.approx(math.log(2), abs=1e-7)  # still the reference at step 0


def _fit(tmp_path, demo, name, steps, lora=LORA, **kwargs):
    rows = demo.pairs_train_file.read_text().splitlines()[:24]
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(rows) + "\n")
    torch.manual_seed(0)
    module = _module(lora=lora, optim=OptimConfig(lr=5e-3, warmup_steps=0), beta=0.5, **kwargs)
    data = PreferenceDataModule(path=str(path), val_split="train", batch_size=8, tokenizer=module.tokenizer)
    trainer = L.Trainer(accelerator="cpu", max_steps=steps, limit_val_batches=0, default_root_dir=tmp_path / name,
                        enable_progress_bar=False, num_sanity_val_steps=0, logger=False, enable_checkpointing=False)
    trainer.fit(module, data)
    return module, data


@pytest.mark.parametrize("lora", [LORA, None], ids=["lora-adapters-off", "full-frozen-copy"])
def test_precomputed_reference_trains_as_the_reference_pass_does(tmp_path, demo, lora):
    # The same 3 steps with the reference computed each step, and precomputed once at fit
    # start: the same weights (up to float reordering of the differently packed passes).
    live, _ = _fit(tmp_path, demo, "live", 3, lora=lora)
    cached, data = _fit(tmp_path, demo, "cached", 3, lora=lora, precompute_reference=True)
    assert data.train_set.has_reference() and data.val_set.has_reference()
    assert cached.ref_model is None  # a full fine-tuning run frees its frozen copy
    live_w = dict(live.model.named_parameters())
    start_w = dict(_ready(_module(lora=lora)).model.named_parameters())
    moved = 0.0
    for name, w in cached.model.named_parameters():
        if w.requires_grad:
            torch.testing.assert_close(w, live_w[name], atol=2e-6, rtol=0)
            moved = max(moved, (w - start_w[name]).abs().max().item())
    assert moved > 1e-3  # they trained: the comparison is not of two untouched models


def test_precomputed_reference_equals_the_starting_model_on_each_pair(tmp_path, demo):
    cached, data = _fit(tmp_path, demo, "cached", 1, lora=None, precompute_reference=True)
    start = _ready(_module(lora=None))  # the same seed: the starting model
    for pair in data.train_set.pairs[:6]:
        want = start._reference_pass(pack_pairs([pair], 0))
        assert list(pair.reference) == pytest.approx(want.tolist(), abs=1e-4)
    # The trained policy is exported as a plain transformers causal LM, with its tokenizer.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    export = tmp_path / "cached" / "model"
    reloaded = AutoModelForCausalLM.from_pretrained(export).eval()
    ids = torch.tensor([AutoTokenizer.from_pretrained(export)("A film that moved me.")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, cached.model.eval()(input_ids=ids).logits)


def test_bad_settings_fail_before_any_weights_load():
    with pytest.raises(ValueError, match="beta must be > 0"):
        _module(beta=0.0)
    with pytest.raises(ValueError, match="unknown loss_type 'kto'"):
        _module(loss_type="kto")
    with pytest.raises(ValueError, match="precompute_reference: true needs a reference model"):
        _module(reference="none", precompute_reference=True)


@pytest.mark.slow
def test_dpo_learns_to_prefer_the_chosen_side_of_its_pairs(tmp_path, demo):
    # Optimisation, measured on the training pairs themselves (val_split: train): from 0.5
    # (ties) and log 2 at step 0 to a clear preference for the chosen side.
    rows = demo.pairs_train_file.read_text().splitlines()[:32]
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(rows) + "\n")
    torch.manual_seed(0)
    module = _module(optim=OptimConfig(lr=5e-3, warmup_steps=5), beta=0.5)
    data = PreferenceDataModule(path=str(path), val_split="train", batch_size=8, tokenizer=module.tokenizer)
    trainer = L.Trainer(accelerator="cpu", max_steps=24, val_check_interval=24, check_val_every_n_epoch=None,
                        default_root_dir=tmp_path, enable_progress_bar=False, num_sanity_val_steps=0,
                        log_every_n_steps=5)
    trainer.fit(module, data)
    metrics = trainer.logged_metrics
    assert metrics["val/rewards/accuracy"] > 0.9, metrics
    assert metrics["val/loss"] < 0.5 * math.log(2) and metrics["val/rewards/margin"] > 0
    assert (tmp_path / "lightning_logs" / "version_0" / "adapter" / "adapter_model.safetensors").is_file()
