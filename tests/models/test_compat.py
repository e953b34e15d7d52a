"""lit_rlhf.models.compat: the names that moved between transformers 5.19 (pinned) and later 5.x,
read from a real model; these fail loudly if a version bump moves them again."""

from __future__ import annotations

import torch

from lit_rlhf.models import ModelConfig, load_model, load_tokenizer
from lit_rlhf.models.compat import activation_checkpointing, cache_kwargs, output_cache
from tests.conftest import TINY_LLAMA


def _lm():
    return load_model(ModelConfig(arch=TINY_LLAMA, tokenizer="demo"), load_tokenizer("demo"), task="causal_lm")


def test_activation_checkpointing_is_read_under_either_name():
    lm = _lm()
    assert activation_checkpointing(lm) is False
    lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert activation_checkpointing(lm) is True


def test_the_kv_cache_goes_in_and_comes_out_under_the_installed_name():
    decoder = _lm().get_decoder()
    ids = torch.randint(0, 100, (1, 5))
    first = decoder(input_ids=ids, use_cache=True)
    cache = output_cache(first)
    assert cache is not None and cache.get_seq_length() == 5
    second = decoder(input_ids=ids[:, :1], use_cache=True, **cache_kwargs(decoder, cache))
    assert output_cache(second).get_seq_length() == 6
