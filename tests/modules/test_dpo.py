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


def test_bad_settings_fail_before_any_weights_load():
    with pytest.raises(ValueError, match="beta must be > 0"):
        _module(beta=0.0)
    with pytest.raises(ValueError, match="unknown loss_type 'kto'"):
        _module(loss_type="kto")


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
