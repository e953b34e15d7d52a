"""Preference data: schemas on fixture files, bad rows, length policies, pair batches and packing."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lit_rlhf.data.formats import load_rows
from lit_rlhf.data.preference import (
    PairBatches,
    PairDataset,
    collate_pairs,
    pack_pairs,
)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


@pytest.mark.parametrize(
    "name, schema, chosen_start",
    [("explicit.jsonl", "explicit", "Review film 0: a wonderful"),
     ("hh.jsonl", "implicit", "\n\nHuman: Is film 0 good?"),
     ("stack_exchange.jsonl", "stack_exchange", "Question: How do I reverse list 0 in Python?\n\nAnswer: Use reversed()")],
)
def test_schema_adapters_on_fixture_files(tokenizer, name, schema, chosen_start):
    ds = PairDataset(load_rows(str(FIXTURES / name)), tokenizer, max_length=128)
    assert ds.schema == schema and len(ds) == 12
    chosen, rejected, margin, *_ = ds.pairs[0]
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
    assert all(len(p.chosen) <= 32 and len(p.rejected) <= 32 for p in cut.pairs)


def test_a_prompt_that_fills_max_length_is_a_bad_row(tokenizer):
    # Truncated to 32 tokens, both sides are the prompt alone: nothing left to compare.
    prompt = "a wonderful film " * 40
    rows = _rows(("short good", "short bad"), (prompt + "good", prompt + "bad"))
    with pytest.raises(ValueError, match=r"row 1: chosen and rejected are identical in their first 32 tokens: "
                                         r"the prompt leaves no room"):
        PairDataset(rows, tokenizer, max_length=32, too_long="truncate")
    skipped = PairDataset(rows, tokenizer, max_length=32, too_long="truncate", on_bad_row="skip")
    assert len(skipped) == 1 and skipped.stats["skipped_bad"] == 1


def test_length_grouped_batches_cover_everything_and_waste_little_padding():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(8, 512, (400,), generator=g).tolist()
    batches = list(PairBatches(lengths, batch_size=8, shuffle=True, seed=0))
    assert sorted(i for b in batches for i in b) == list(range(400))
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    random_order = torch.randperm(400, generator=g).tolist()
    padded_random = sum(8 * max(lengths[i] for i in random_order[k:k + 8]) for k in range(0, 400, 8))
    assert padded / sum(lengths) < 1.1 < padded_random / sum(lengths)


@pytest.mark.parametrize("n", [403, 400, 401])
def test_ranks_together_train_on_the_global_batches_of_one_process(monkeypatch, n):
    # One process with batch 16 and two with batch 8 each: the same pairs at every step, and
    # the ranks in lockstep (the same number of batches, never an empty one).
    lengths = torch.randint(8, 512, (n,), generator=torch.Generator().manual_seed(1)).tolist()
    single = PairBatches(lengths, batch_size=16, shuffle=True, seed=3)
    monkeypatch.setattr(PairBatches, "_rank_world", lambda self: (0, 1))
    one = list(single)
    ranks = []
    for rank in (0, 1):
        monkeypatch.setattr(PairBatches, "_rank_world", lambda self, r=rank: (r, 2))
        sampler = PairBatches(lengths, batch_size=8, shuffle=True, seed=3)
        ranks.append((list(sampler), len(sampler)))
    (b0, n0), (b1, n1) = ranks
    assert len(b0) == len(b1) == n0 == n1 == (n // 16 + (n % 16 >= 2))
    assert all(b0[k] and b1[k] for k in range(n0))
    # (a last global batch of one pair cannot feed two ranks: they leave it out)
    assert [sorted(a + b) for a, b in zip(b0, b1)] == [sorted(b) for b in one if len(b) >= 2]


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
