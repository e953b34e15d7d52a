"""Reward model: schemas, batching, one-forward scoring, padding, export round-trip, DDP."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from lit_rlhf.data.formats import load_rows
from lit_rlhf.data.preference import (
    PairBatches,
    PairDataset,
    PreferenceDataModule,
    collate_pairs,
    pack_pairs,
)
from lit_rlhf.models import LoraSettings, ModelConfig
from lit_rlhf.modules import RewardModule
from lit_rlhf.optim import OptimConfig
from tests.conftest import TINY_LLAMA

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures"


@pytest.mark.parametrize(
    "name, schema, chosen_start",
    [("explicit.jsonl", "explicit", "Review film 0: a wonderful"),
     ("hh.jsonl", "implicit", "\n\nHuman: Is film 0 good?"),
     ("stack_exchange.jsonl", "stack_exchange", "Question: How do I reverse list 0 in Python?\n\nAnswer: Use reversed()")],
)
def test_schema_adapters_on_fixture_files(tokenizer, name, schema, chosen_start):
    ds = PairDataset(load_rows(str(FIXTURES / name)), tokenizer, max_length=128)
    assert ds.schema == schema and len(ds) == 12
    chosen, rejected, margin = ds.pairs[0]
    assert tokenizer.decode(chosen).startswith(chosen_start)
    assert chosen != rejected and margin == 0.0


def _rows(*pairs):
    import datasets

    return datasets.Dataset.from_list([{"chosen": c, "rejected": r} for c, r in pairs])


@pytest.mark.parametrize(
    "pair, message",
    [(("same text", "same text"), "row 1: chosen and rejected are identical"),
     (("", "fine"), "row 1: field 'chosen' is empty"),
     (("good", "   "), "row 1: field 'rejected' is empty")],
)
def test_bad_rows_are_named_or_counted(tokenizer, pair, message):
    rows = _rows(("a good film", "a bad film"), pair)
    with pytest.raises(ValueError, match=message):
        PairDataset(rows, tokenizer)
    ds = PairDataset(rows, tokenizer, on_bad_row="skip")
    assert len(ds) == 1 and ds.stats["skipped_bad"] == 1


def test_missing_columns_are_named(tokenizer):
    import datasets

    rows = datasets.Dataset.from_list([{"chosen": "a", "loser": "b"}])
    with pytest.raises(ValueError, match=r"columns \['chosen', 'loser'\] match no preference schema"):
        PairDataset(rows, tokenizer)
    with pytest.raises(ValueError, match=r"missing column\(s\) \['rejected'\]"):
        PairDataset(rows, tokenizer, schema="implicit")


def test_max_length_policies_are_counted(tokenizer):
    long = "a wonderful film " * 40
    rows = _rows(("short good", "short bad"), (long + "good", long + "bad"))
    dropped = PairDataset(rows, tokenizer, max_length=32)
    assert len(dropped) == 1 and dropped.stats["dropped_too_long"] == 1
    cut = PairDataset(_rows(("short good", "short bad"), ("good " + long, "bad " + long)), tokenizer,
                      max_length=32, too_long="truncate")
    assert len(cut) == 2 and cut.stats["truncated"] == 1
    assert all(len(c) <= 32 and len(r) <= 32 for c, r, _ in cut.pairs)


def test_length_grouped_batches_cover_everything_and_waste_little_padding():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(8, 512, (400,), generator=g).tolist()
    batches = list(PairBatches(lengths, batch_size=8, shuffle=True, seed=0))
    assert sorted(i for b in batches for i in b) == list(range(400))
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    random_order = torch.randperm(400, generator=g).tolist()
    padded_random = sum(8 * max(lengths[i] for i in random_order[k:k + 8]) for k in range(0, 400, 8))
    assert padded / sum(lengths) < 1.1 < padded_random / sum(lengths)


def test_collate_puts_chosen_first_and_right_pads():
    batch = collate_pairs([([1, 2, 3], [4], 0.5), ([5], [6, 7], 0.0)], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [5, 0, 0], [4, 0, 0], [6, 7, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0], [1, 0, 0], [1, 1, 0]]
    assert batch["margin"].tolist() == [0.5, 0.0]


def test_pack_pairs_lays_sequences_end_to_end_chosen_first():
    batch = pack_pairs([([1, 2, 3], [4], 0.5), ([5], [6, 7], 0.0)], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 5, 4, 6, 7]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 0, 0, 1]]
    assert batch["lengths"].tolist() == [3, 1, 1, 2]
    assert batch["margin"].tolist() == [0.5, 0.0]


def test_segment_attention_equals_one_sdpa_call_per_sequence():
    import torch.nn.functional as F

    from lit_rlhf.attention import segment_sdpa

    g = torch.Generator().manual_seed(0)
    lengths = [3, 7, 1, 5]
    # 4 query heads over 2 key/value heads (grouped-query attention), one packed row.
    q = torch.randn(1, 4, sum(lengths), 8, generator=g)
    k, v = torch.randn(1, 2, sum(lengths), 8, generator=g), torch.randn(1, 2, sum(lengths), 8, generator=g)
    out, _ = segment_sdpa(None, q, k, v, None, scaling=0.5, segment_lengths=lengths)
    assert out.shape == (1, sum(lengths), 4, 8)
    start = 0
    for n in lengths:  # naive reference: each sequence alone, keys/values repeated per group
        ks, vs = (t[:, :, start:start + n].repeat_interleave(2, dim=1) for t in (k, v))
        ref = F.scaled_dot_product_attention(q[:, :, start:start + n], ks, vs, is_causal=True, scale=0.5)
        torch.testing.assert_close(out[:, start:start + n], ref.transpose(1, 2))
        start += n
    with pytest.raises(ValueError, match="15 tokens for segment lengths summing to 16"):
        segment_sdpa(None, q[:, :, :-1], k[:, :, :-1], v[:, :, :-1], None, segment_lengths=lengths)


def test_segment_attention_runs_in_float32_under_cpu_autocast():
    # CPU bf16 SDPA keeps compiled kernels for every new length; the segment path upcasts.
    from lit_rlhf.attention import segment_sdpa

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 9, 8, generator=g).bfloat16() for _ in range(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = segment_sdpa(None, q, k, v, None, scaling=0.3, segment_lengths=[4, 5])
    assert out.dtype == torch.bfloat16
    ref, _ = segment_sdpa(None, q.float(), k.float(), v.float(), None, scaling=0.3, segment_lengths=[4, 5])
    torch.testing.assert_close(out, ref.bfloat16(), atol=0, rtol=0)


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
    from lit_rlhf.attention import SEGMENT_SDPA

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
    from lit_rlhf.attention import SEGMENT_SDPA

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


def test_pair_metrics_count_ties_as_wrong_and_match_torch_statistics():
    from lit_rlhf.metrics import PairMetrics

    metric = PairMetrics()
    metric.update(torch.tensor([1.0, 2.0]), torch.tensor([0.0, 2.0]))  # a win and a tie
    metric.update(torch.tensor([-1.0]), torch.tensor([3.0]))  # a loss
    out = metric.compute()
    scores = torch.tensor([1.0, 2.0, 0.0, 2.0, -1.0, 3.0])
    assert out["accuracy"].item() == pytest.approx(1 / 3)
    assert out["margin"].item() == pytest.approx((1 + 0 - 4) / 3)
    assert out["reward_mean"].item() == pytest.approx(scores.mean().item())
    assert out["reward_std"].item() == pytest.approx(scores.std(unbiased=False).item())
