"""Dataset names: a package registers what a name stands for; the data modules resolve it before
treating the path as files or a hub dataset."""

from __future__ import annotations

import json

import pytest

from lit_rlhf.data import SFTDataModule
from lit_rlhf.data.sources import (
    DatasetSource,
    register_dataset,
    registered_datasets,
    resolve_dataset,
)


def test_a_registered_name_stands_for_files_or_rows(tmp_path, tokenizer):
    rows = [{"text": f"review number {i} was a fine film to see"} for i in range(40)]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:32]))
    (tmp_path / "validation.jsonl").write_text("\n".join(json.dumps(r) for r in rows[32:]))
    calls = []

    def build(seed: int, val_size: int) -> DatasetSource:
        calls.append((seed, val_size))
        return DatasetSource(path=str(tmp_path), val_split="validation", description="my reviews")

    register_dataset("my-reviews", "sft", build)
    assert "my-reviews" in registered_datasets("sft") and "my-reviews" not in registered_datasets("prompts")
    assert {"demo", "arithmetic"} <= set(registered_datasets())  # the demo's, through its registration
    dm = SFTDataModule("my-reviews", seq_length=16, batch_size=2, seed=3, val_size=5, tokenizer=tokenizer)
    dm.setup("fit")
    assert calls == [(3, 5)] and len(dm.train_set) > 0 and len(dm.val_set) > 0
    # Unregistered: the path itself, as given (files or a hub name).
    assert resolve_dataset(str(tmp_path), "sft", val_split="validation") == DatasetSource(
        path=str(tmp_path), val_split="validation", description=str(tmp_path))


def test_the_library_names_no_dataset_of_the_demo():
    # The generic modules take `path` as their first argument: no default points at the demo.
    from lit_rlhf.data import PreferenceDataModule, PromptDataModule

    for cls in (SFTDataModule, PreferenceDataModule, PromptDataModule):
        with pytest.raises(TypeError, match="path"):
            cls()
