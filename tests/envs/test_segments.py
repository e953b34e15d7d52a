"""Observations as token segments: plain text tokenized on its own; chat observations as what
the template appends after the policy's turn, with the prefix check naming the turn."""

from __future__ import annotations

import pytest

from lit_rlhf.envs import Transcript
from lit_rlhf.models.templates import CHATML

# A template that shows only the last assistant turn's text (as reasoning templates drop earlier
# thoughts): adding a message re-renders the earlier turns.
FORGETFUL = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' and not loop.last %}{{ '<|im_start|>assistant\n...<|im_end|>\n' }}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.fixture
def chat_tokenizer(tokenizer):
    tok = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHATML
    return tok


def test_a_text_observation_is_tokenized_on_its_own(tokenizer):
    segment = Transcript(tokenizer).observation_tokens([5, 6], " the best film", 1)
    assert segment == tokenizer(" the best film", add_special_tokens=False)["input_ids"]


def test_a_chat_observation_is_what_the_template_appends_after_the_sampled_turn(chat_tokenizer):
    tok = chat_tokenizer
    transcript = Transcript(tok, [{"role": "user", "content": "what is 12*3?"}])
    assert tok.decode(transcript.prompt_tokens()) == "<|im_start|>user\nwhat is 12*3?<|im_end|>\n<|im_start|>assistant\n"
    call = '<tool_call>{"name": "calculator"}</tool_call>'
    # The policy sampled its call and the end-of-turn token: the segment starts after it.
    action = tok(call, add_special_tokens=False)["input_ids"] + tok.convert_tokens_to_ids(["<|im_end|>"])
    segment = transcript.observation_tokens(action, [{"role": "tool", "content": "36"}], 1)
    assert tok.decode(segment) == "\n<|im_start|>tool\n36<|im_end|>\n<|im_start|>assistant\n"
    # Stopped before its end-of-turn token: the template's closes the turn, as context.
    transcript = Transcript(tok, [{"role": "user", "content": "what is 12*3?"}])
    segment = transcript.observation_tokens(action[:-1], [{"role": "tool", "content": "36"}], 1)
    assert tok.decode(segment) == "<|im_end|>\n<|im_start|>tool\n36<|im_end|>\n<|im_start|>assistant\n"


def test_a_template_that_re_renders_earlier_turns_is_an_error_naming_the_turn(chat_tokenizer):
    tok = chat_tokenizer
    tok.chat_template = FORGETFUL
    transcript = Transcript(tok, [{"role": "user", "content": "q"}])
    # The tool message makes the policy's turn no longer the last: the template hides its text.
    with pytest.raises(ValueError, match=r"^turn 1: adding the environment's message changes how the chat "
                                         r"template renders the earlier turns"):
        transcript.observation_tokens(tok("first", add_special_tokens=False)["input_ids"],
                                      [{"role": "tool", "content": "36"}], 1)


def test_messages_after_a_plain_text_prompt_are_refused(tokenizer):
    with pytest.raises(ValueError, match="turn 1: the environment answered with messages"):
        Transcript(tokenizer).observation_tokens([5], [{"role": "tool", "content": "x"}], 1)
