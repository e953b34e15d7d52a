"""end_of_turn_ids: the tokenizer's EOS, the generation config's list and the chat template's
end-of-turn token, for chat models whose end of turn is not ``eos_token``."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer, GenerationConfig

from lit_rlhf.models.templates import CHATML, LLAMA3, end_of_turn_ids


@pytest.fixture()
def fresh(demo):
    """The demo tokenizer (EOS ``<|endoftext|>``, id 0), loaded anew: the tests add tokens to it."""
    return AutoTokenizer.from_pretrained(demo.tokenizer_dir)


def test_chatml_im_end_counts_where_eos_is_another_token(fresh):
    fresh.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    fresh.chat_template = CHATML
    im_end = fresh.convert_tokens_to_ids("<|im_end|>")
    assert fresh.eos_token == "<|endoftext|>" and im_end != fresh.eos_token_id
    assert end_of_turn_ids(fresh) == [fresh.eos_token_id, im_end]
    # The generation config's list joins them, each id once.
    config = GenerationConfig(eos_token_id=[im_end, 7, fresh.eos_token_id])
    assert end_of_turn_ids(fresh, config) == [fresh.eos_token_id, im_end, 7]
    assert end_of_turn_ids(fresh, GenerationConfig(eos_token_id=9)) == [fresh.eos_token_id, 9, im_end]


def test_llama3_eot_id_is_found_from_the_template(fresh):
    fresh.add_special_tokens({"additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]})
    fresh.chat_template = LLAMA3
    assert end_of_turn_ids(fresh) == [fresh.eos_token_id, fresh.convert_tokens_to_ids("<|eot_id|>")]


def test_no_template_token_where_it_is_plain_text_or_the_template_refuses(fresh):
    assert end_of_turn_ids(fresh) == [fresh.eos_token_id]  # no chat template
    fresh.chat_template = CHATML  # "<|im_end|>" is not a token here: its pieces cannot end a turn
    assert end_of_turn_ids(fresh) == [fresh.eos_token_id]
    fresh.chat_template = "{{ raise_exception('a system message first') }}"
    assert end_of_turn_ids(fresh) == [fresh.eos_token_id]
