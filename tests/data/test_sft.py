"""SFTDataModule and the row loaders, on local files of every supported format."""

from __future__ import annotations

import json
import re

import pytest

from lit_rlhf.data.formats import TextFormatter, load_rows
from lit_rlhf.data.sft import SFTDataModule

STACK_ROWS = [
    {"question": f"How do I sort list number {i} in Python?", "response_j": f"Use sorted() on list {i}.",
     "response_k": "You cannot."}
    for i in range(40)
]


def _write(path, rows, fmt):
    import datasets

    ds = datasets.Dataset.from_list(rows)
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif fmt == "csv":
        ds.to_csv(str(path))
    elif fmt == "parquet":
        ds.to_parquet(str(path))
    return path


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_load_rows_local_formats(tmp_path, fmt):
    path = _write(tmp_path / f"rows.{fmt}", STACK_ROWS, fmt)
    rows = load_rows(str(path))
    assert len(rows) == 40 and rows[3]["question"] == STACK_ROWS[3]["question"]


def test_load_rows_text_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("first line\nsecond line\n")
    assert load_rows(str(path))["text"] == ["first line", "second line"]


def test_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_rows(str(tmp_path / "nope.jsonl"))


def test_stack_exchange_template():
    fmt = TextFormatter(template="Question: {question}\n\nAnswer: {response_j}")
    assert fmt(STACK_ROWS[0]) == "Question: How do I sort list number 0 in Python?\n\nAnswer: Use sorted() on list 0."
    assert fmt.fields == ["question", "response_j"]
    pair = TextFormatter(template="Question: {question}\n\nAnswer: ", completion_template="{response_j}")
    assert pair(STACK_ROWS[1]) == ("Question: How do I sort list number 1 in Python?\n\nAnswer: ", "Use sorted() on list 1.")
    assert pair.completion_only


def test_datamodule_packs_local_jsonl(tmp_path, tokenizer):
    path = _write(tmp_path / "se.jsonl", STACK_ROWS, "jsonl")
    dm = SFTDataModule(path=str(path), template="Question: {question}\n\nAnswer: {response_j}",
                       seq_length=32, batch_size=4, val_size=8, tokenizer=tokenizer)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"input_ids", "labels", "position_ids"}
    assert batch["input_ids"].shape == (4, 32)
    assert len(dm.train_set) > 0 and len(dm.val_set) > 0
    assert tokenizer.eos_token_id in batch["input_ids"]


def test_datamodule_completion_only(tmp_path, tokenizer):
    path = _write(tmp_path / "se.jsonl", STACK_ROWS, "jsonl")
    dm = SFTDataModule(path=str(path), template="Question: {question}\n\nAnswer: ",
                       completion_template="{response_j}", seq_length=32, batch_size=2, val_size=8,
                       tokenizer=tokenizer)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    masked = (batch["labels"] == -100).float().mean().item()
    assert 0.3 < masked < 0.95  # the question tokens carry no loss, the answers do


def test_missing_field_is_named_before_any_model(tmp_path, tokenizer):
    path = _write(tmp_path / "se.jsonl", STACK_ROWS, "jsonl")
    dm = SFTDataModule(path=str(path), text_field="body", seq_length=32, val_size=8, tokenizer=tokenizer)
    with pytest.raises(ValueError, match=r"missing field\(s\) \['body'\]"):
        dm.setup("fit")


def test_empty_text_is_named(tmp_path, tokenizer):
    rows = [{"text": "a fine film " * 5} for _ in range(30)] + [{"text": ""}]
    path = _write(tmp_path / "t.jsonl", rows, "jsonl")
    dm = SFTDataModule(path=str(path), seq_length=16, val_size=5, tokenizer=tokenizer, seed=1)
    # The file's own line (31), not the row's place in the shuffled train split.
    with pytest.raises(ValueError, match=r"t\.jsonl: line 31: field 'text' is '', expected non-empty text"):
        dm.setup("fit")


@pytest.mark.parametrize("value", [None, 7, ["a", "list"]])
def test_a_text_field_that_is_not_text_names_file_line_and_field(tmp_path, tokenizer, value):
    rows = [{"text": "a fine film " * 5} for _ in range(29)] + [{"text": value}] + [{"text": "more"}] * 5
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    dm = SFTDataModule(path=str(path), seq_length=16, val_size=5, tokenizer=tokenizer)
    with pytest.raises(ValueError, match=r"t\.jsonl: line 30: field 'text' is"):
        dm.setup("fit")


def test_too_little_data_is_explained(tmp_path, tokenizer):
    path = _write(tmp_path / "t.jsonl", [{"text": "short"} for _ in range(12)], "jsonl")
    dm = SFTDataModule(path=str(path), seq_length=256, val_size=2, tokenizer=tokenizer)
    with pytest.raises(ValueError, match="seq_length=256"):
        dm.setup("fit")


def test_bad_sizes_fail_at_construction():
    with pytest.raises(ValueError, match="seq_length"):
        SFTDataModule("demo", seq_length=1)
    with pytest.raises(ValueError, match="batch_size"):
        SFTDataModule("demo", batch_size=0)


@pytest.mark.parametrize("content, expected", [
    ("", "the file is empty"),
    ('{"text": "a"}\n{"text": "b"}\n{"text": oops}\n', "line 3: not valid JSON (Expecting value, column 10)"),
    ('{"text": "a"}\n[1, 2]\n', "line 2: a JSON list, not an object with fields"),
])
def test_unreadable_data_files_are_named_with_the_line(content, expected, tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text(content)
    with pytest.raises(ValueError, match=re.escape(f"{path}") + ".*" + re.escape(expected)):
        load_rows(str(path))


def test_a_negative_val_size_is_named(tmp_path):
    from lit_rlhf.data.formats import load_train_val

    path = tmp_path / "rows.jsonl"
    path.write_text('{"text": "a"}\n' * 4)
    with pytest.raises(ValueError, match="data.val_size must be >= 1 without a val_split, got -1"):
        load_train_val(str(path), val_size=-1)
