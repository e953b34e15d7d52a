"""Prompt data: long prompts filtered and counted, the stream resumes and splits ranks."""

from __future__ import annotations

import pytest

from tests.modules.ppo_helpers import make_data, make_module


def test_long_prompts_are_filtered_and_counted():
    module = make_module()
    dm = make_data(module, max_prompt_length=4)
    dm.setup("fit")
    assert dm.stats["train_too_long"] > 0 and dm.stats["train_prompts"] > 0
    assert all(len(ids) <= 4 for _, ids, *_ in dm.train_prompts)
    with pytest.raises(ValueError, match="no prompt fits max_prompt_length=1"):
        bad = make_data(module, max_prompt_length=1)
        bad.setup("fit")


def test_prompt_stream_resumes_and_splits_ranks():
    from lit_rlhf.data.prompts import PromptStream

    prompts = [(f"p{i}", [1, i + 2]) for i in range(40)]
    stream = PromptStream(prompts, batch_size=4, pad_id=0, seed=1, start=3)
    first = next(iter(stream))
    assert first["index"] == 3 and first["prompt"] == PromptStream(prompts, 4, 0, seed=1).batch(3)["prompt"]
    # Two ranks: disjoint slices of the same global batch.
    rank0, rank1 = (PromptStream(prompts, 4, 0, seed=1) for _ in range(2))
    rank0._rank_world = lambda: (0, 2)
    rank1._rank_world = lambda: (1, 2)
    a, b = rank0.batch(2)["prompt"], rank1.batch(2)["prompt"]
    assert len(a) == len(b) == 4 and not set(a) & set(b)
