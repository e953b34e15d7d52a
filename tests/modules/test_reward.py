"""RewardModule: one-forward scoring, packed == padded, export, learning, DDP."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from lit_rlhf.data.preference import (
    PreferenceDataModule,
    collate_pairs,
    pack_pairs,
)
from lit_rlhf.models import LoraSettings, ModelConfig
from lit_rlhf.modules import RewardModule
from lit_rlhf.optim import OptimConfig
from tests.conftest import TINY_LLAMA

ROOT = Path(__file__).resolve().parents[2]


def _module(lora=None, lr=1e-3, **kwargs):
    lm = ModelConfig(arch=TINY_LLAMA, tokenizer="demo", lora=lora)
    return RewardModule(lm, OptimConfig(lr=lr, warmup_steps=0), **kwargs)


def _configured(module):
    module.configure_model()
    return module.eval()


def test_one_forward_equals_separate_forwards_and_padding_side_does_not_matter(tokenizer):
    module = _configured(_module())
    texts = ["a wonderful film", "a dull, tedious and overlong mess of a film"]
    ids = [tokenizer(t)["input_ids"] for t in texts]
    batch = collate_pairs([(ids[0], ids[1], 0.0)], tokenizer.pad_token_id)
    with torch.no_grad():
        together = module(batch["input_ids"], batch["attention_mask"])
        alone = [module(torch.tensor([i]), torch.ones(1, len(i), dtype=torch.long)) for i in ids]
        # Left padding: the same short text with pads in front.
        width = len(ids[1])
        left = torch.tensor([[tokenizer.pad_token_id] * (width - len(ids[0])) + ids[0]])
        left_mask = (left != tokenizer.pad_token_id).long()
        left_score = module(left, left_mask)
    torch.testing.assert_close(together, torch.cat(alone), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(left_score, alone[0], atol=1e-5, rtol=1e-5)
    # Control: the head applied at every position; the padded row's final slot differs from
    # its last real token, so reading the wrong position would have failed the checks above.
    with torch.no_grad():
        hidden = module.model.model(input_ids=batch["input_ids"][:1]).last_hidden_state
        per_token = module.model.score(hidden).squeeze(-1)[0]
    assert per_token[len(ids[0]) - 1].item() == pytest.approx(alone[0].item(), abs=1e-5)
    assert abs(per_token[-1].item() - alone[0].item()) > 1e-3


@pytest.mark.parametrize("lora", [None, LoraSettings(r=4, alpha=8, dropout=0.0, target_modules="all-linear")],
                         ids=["full", "lora"])  # no LoRA dropout: both passes run in train mode
@pytest.mark.parametrize("checkpointing", [False, True], ids=["", "checkpointing"])
def test_packed_scores_and_gradients_equal_padded_ones(lora, checkpointing):
    module = _module(lora=lora)
    module.lm_config.gradient_checkpointing = checkpointing
    module = _configured(module).train()  # train mode: checkpointing recomputes in backward
    if lora is not None:  # a non-trivial adapter, so that the peft path matters
        with torch.no_grad():
            for name, p in module.model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.1)
    g = torch.Generator().manual_seed(0)
    lengths = [5, 17, 9, 30, 3, 12, 25, 8]
    seqs = [torch.randint(3, 500, (n,), generator=g).tolist() for n in lengths]
    pairs = [(seqs[i], seqs[i + 4], 0.0) for i in range(4)]
    pad = module.tokenizer.pad_token_id
    packed, padded = pack_pairs(pairs, pad), collate_pairs(pairs, pad)
    assert packed["input_ids"].shape == (1, sum(lengths))  # no padding at all
    from lit_rlhf.models.attention import SEGMENT_SDPA

    base = module.model.get_base_model() if lora is not None else module.model
    assert base.config._attn_implementation == SEGMENT_SDPA  # the per-sequence path, not the fallback

    def scores_and_grads(step):
        module.zero_grad()
        scores = step()
        scores.pow(2).sum().backward()
        return scores.detach(), {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}

    a, grads_a = scores_and_grads(lambda: module.forward_packed(packed["input_ids"], packed["position_ids"],
                                                                packed["lengths"]))
    b, grads_b = scores_and_grads(lambda: module(padded["input_ids"], padded["attention_mask"]))
    # Equal scores mean no attention leaked between the sequences sharing the row.
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], atol=1e-4, rtol=1e-4, msg=name)


@pytest.mark.parametrize("arch, attn", [(TINY_LLAMA, "eager"), ({**TINY_LLAMA, "model_type": "mistral", "sliding_window": 4}, "sdpa")],
                         ids=["eager", "sliding-window"])
def test_packed_batches_fall_back_to_padded_rows_where_segment_attention_does_not_apply(arch, attn):
    from lit_rlhf.models.attention import SEGMENT_SDPA

    module = RewardModule(ModelConfig(arch=arch, tokenizer="demo", attn_implementation=attn))
    module = _configured(module)
    # Segment attention would ignore the eager choice and the sliding window: not switched in.
    assert module.model.config._attn_implementation == attn != SEGMENT_SDPA
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(3, 500, (n,), generator=g).tolist() for n in (9, 3, 12, 6)]
    pairs = [(seqs[0], seqs[2], 0.0), (seqs[1], seqs[3], 0.0)]
    pad = module.tokenizer.pad_token_id
    packed, padded = pack_pairs(pairs, pad), collate_pairs(pairs, pad)
    with torch.no_grad():
        a = module.forward_packed(packed["input_ids"], packed["position_ids"], packed["lengths"])
        b = module(padded["input_ids"], padded["attention_mask"])
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def _fit(tmp_path, module, steps=30, batch_size=8, **trainer_kwargs):
    dm = PreferenceDataModule(path="demo", batch_size=batch_size, max_length=128, tokenizer=module.tokenizer,
                              max_train_pairs=steps * batch_size, val_size=64)
    trainer = L.Trainer(accelerator="cpu", devices=1, default_root_dir=tmp_path, max_steps=steps,
                        enable_progress_bar=False, num_sanity_val_steps=0, log_every_n_steps=5,
                        limit_val_batches=8, **trainer_kwargs)
    trainer.fit(module, dm)
    return trainer


def test_lora_fit_exports_a_plain_transformers_model_with_the_same_scores(tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

    module = _module(lora=LoraSettings(r=4, alpha=8, dropout=0.0))
    trainer = _fit(tmp_path, module, steps=20)
    export = Path(trainer.log_dir) / "export"
    meta = json.loads((export / "lit_rlhf.json").read_text())
    assert set(meta) == {"reward_mean", "reward_std", "val_accuracy"} and meta["reward_std"] > 0

    # The score head was trained (it starts random) and survives the merge.
    model = AutoModelForSequenceClassification.from_pretrained(export).eval()
    tok = AutoTokenizer.from_pretrained(export)
    texts = ["a wonderful, moving film", "the plot dragged and the acting was dull"]
    enc = tok(texts, return_tensors="pt", padding=True)
    module.eval()
    with torch.no_grad():
        want = module(enc["input_ids"], enc["attention_mask"])
        got = model(**enc).logits.squeeze(-1)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    # ... and it works in a stock text-classification pipeline.
    clf = pipeline("text-classification", model=model, tokenizer=tok, function_to_apply="none")
    assert clf(texts[0])[0]["score"] == pytest.approx(got[0].item(), abs=1e-4)


def test_demo_reward_model_learns(tmp_path):
    torch.manual_seed(0)
    trainer = _fit(tmp_path, _module(lr=2e-3), steps=200, batch_size=16, val_check_interval=200,
                   check_val_every_n_epoch=None)
    assert trainer.logged_metrics["val/accuracy"] > 0.7


@pytest.mark.slow
def test_ddp_two_process_cpu_fit(tmp_path):
    cmd = [sys.executable, "train.py", "fit", "-c", "configs/rm/demo.yaml",
           f"--trainer.default_root_dir={tmp_path}", "--trainer.devices=2", "--trainer.strategy=ddp",
           "--trainer.max_steps=4", "--trainer.val_check_interval=4", "--trainer.limit_val_batches=2",
           "--trainer.enable_progress_bar=false", "--data.init_args.max_train_pairs=128"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    export = next(tmp_path.glob("lightning_logs/version_*/export"))
    assert (export / "model.safetensors").is_file() and (export / "lit_rlhf.json").is_file()
