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
