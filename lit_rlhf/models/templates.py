"""Chat templates: the tokenizer's own, or a built-in one / a Jinja file for tokenizers without.

``model.init_args.lm.chat_template`` (:class:`~lit_rlhf.models.ModelConfig`) names one; :func:`load_tokenizer`
stores its text on the tokenizer, so ``tokenizer.save_pretrained`` writes it beside every
exported model and adapter, and the data modules render conversations with it.
"""

from __future__ import annotations

from pathlib import Path

# Written from the published format descriptions. ChatML (OpenAI; Qwen, SmolLM, ...).
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# ChatML that opens with a default system prompt when the conversation has none (as Qwen2.5's).
CHATML_SYSTEM = (
    "{% if messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}"
    "{% endif %}" + CHATML
)
# Llama 3's header style: BOS, then <|start_header_id|>role<|end_header_id|>\n\ncontent<|eot_id|>.
LLAMA3 = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
TEMPLATES = {"chatml": CHATML, "chatml-system": CHATML_SYSTEM, "llama3": LLAMA3}


def resolve_template(chat_template: str) -> str:
    """The Jinja text of ``chat_template``: a built-in name or a file."""
    if chat_template in TEMPLATES:
        return TEMPLATES[chat_template]
    path = Path(chat_template).expanduser()
    if path.is_file():
        return path.read_text()
    raise ValueError(f"model.init_args.lm.chat_template {chat_template!r}: no such file, and not one of {', '.join(TEMPLATES)}")


def end_of_turn_ids(tokenizer, generation_config=None) -> list[int]:
    """Every token id that ends the policy's turn, the tokenizer's EOS first.

    * ``tokenizer.eos_token_id``;
    * ``generation_config.eos_token_id``, an id or a list (Llama-3 lists ``<|end_of_text|>`` and
      ``<|eot_id|>``);
    * the chat template's end of an assistant turn: the special token it writes right after the
      assistant's text (ChatML ``<|im_end|>`` where EOS is another token, as in Qwen2.5 base
      models; Llama-3 ``<|eot_id|>``; Gemma ``<end_of_turn>``), found by rendering a two-message
      conversation. None is added when the tokenizer has no template, the template refuses that
      conversation, or what follows the text is not one special token (a template that writes
      ``<|im_end|>`` for a tokenizer without it as a token: plain text, which cannot end a turn).

    Sampling stops at any of them, and "ended" (``Rollout.ended_with``), the missing-EOS penalty
    and the truncation statistics use the same list.
    """
    ids: list[int] = []
    found = [tokenizer.eos_token_id, getattr(generation_config, "eos_token_id", None), _template_end(tokenizer)]
    for value in found:
        for i in value if isinstance(value, (list, tuple)) else [value]:
            if i is not None and int(i) not in ids:
                ids.append(int(i))
    return ids


def _template_end(tokenizer) -> int | None:
    """The special token the chat template writes right after an assistant message's text, if any."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    text = "lit-rlhf-probe"
    conversation = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": text}]
    try:
        rendered = tokenizer.apply_chat_template(conversation, tokenize=False)
    except Exception:  # a template's own checks (e.g. a system turn first): no template token known
        return None
    tail = rendered[rendered.rfind(text) + len(text):].lstrip() if text in rendered else ""
    first = tokenizer(tail, add_special_tokens=False)["input_ids"][:1] if tail else []
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items()
                                                if getattr(t, "special", False)}
    return first[0] if first and first[0] in special else None
