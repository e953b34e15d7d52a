"""Conversations: messages checked, rendered by a chat template, assistant tokens found.

A conversation is a list of ``{"role": "system"|"user"|"assistant"|"tool", "content": str}``.
The tokenizer's chat template renders it to text (:func:`render`); for tokenizers without one,
``model.init_args.lm.chat_template`` names a built-in template or a Jinja file (see
:mod:`lit_rlhf.models.templates`), which the loader stores on the tokenizer.

Assistant-only loss needs to know which tokens an assistant turn produced. Templates differ
(end-of-turn tokens, headers, default system prompts), so rather than parse them,
:func:`assistant_spans` renders the conversation prefix by prefix: an assistant turn ``i``
spans from the end of ``render(messages[:i], add_generation_prompt=True)`` to the end of
``render(messages[:i + 1])``, its end-of-turn token included. This holds for any template whose
renderings of a conversation's prefixes are prefixes of the whole; a template that breaks
it is an error naming the turn.
"""

from __future__ import annotations

ROLES = ("system", "user", "assistant", "tool")

def template_of(tokenizer) -> str:
    """The tokenizer's chat template (set from ``model.init_args.lm.chat_template`` by the loader)."""
    own = getattr(tokenizer, "chat_template", None)
    if not own:
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise ValueError(f"tokenizer {name!r} has no chat template for conversational data (set "
                         "model.init_args.lm.chat_template to a .jinja file or one of chatml, chatml-system, llama3)")
    return own


def is_conversation(value) -> bool:
    """A list whose items look like messages (dicts): conversational data."""
    return isinstance(value, list) and bool(value) and all(isinstance(m, dict) for m in value)


def check_messages(messages, where: str, *, need_assistant: bool = False) -> list[dict]:
    """``messages`` as a list of ``{role, content}``; a one-line error naming ``where`` otherwise."""
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: expected a non-empty list of messages, got {messages!r:.80}")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ValueError(f"{where}: message {i} needs 'role' and 'content', got {message!r:.80}")
        if message["role"] not in ROLES:
            raise ValueError(f"{where}: message {i} has unknown role {message['role']!r} (roles: {', '.join(ROLES)})")
        if not isinstance(message["content"], str):
            raise ValueError(f"{where}: message {i} content is {type(message['content']).__name__}, not text")
        out.append({"role": message["role"], "content": message["content"]})
    if need_assistant and not any(m["role"] == "assistant" for m in out):
        raise ValueError(f"{where}: the conversation has no assistant turn to train on")
    return out


def as_messages(value, where: str) -> list[dict]:
    """A prompt given as text is one user message; a list is checked as messages."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    return check_messages(value, where)


def render(tokenizer, messages: list[dict], template: str, add_generation_prompt: bool = False,
           tools: list | None = None) -> str:
    """The conversation as text, by ``template`` (``tools``: callables or JSON schemas the
    template lists for the model, as transformers' ``tools=``)."""
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                         add_generation_prompt=add_generation_prompt, tools=tools)


def assistant_spans(tokenizer, messages: list[dict], template: str, where: str = "conversation"
                    ) -> tuple[str, list[tuple[int, int]]]:
    """(rendered text, character spans of the assistant turns), see the module docstring."""
    text = render(tokenizer, messages, template)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = render(tokenizer, messages[:i], template, add_generation_prompt=True) if i else ""
        end = render(tokenizer, messages[: i + 1], template)
        if not (text.startswith(start) and text.startswith(end) and len(start) <= len(end)):
            raise ValueError(f"{where}: the chat template does not render the conversation up to message {i} "
                             "as the start of the whole conversation, so the assistant turn's tokens cannot "
                             "be found (use a template whose prefix renderings are prefixes)")
        spans.append((len(start), len(end)))
    return text, spans


def tokens_with_mask(tokenizer, text: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[bool]]:
    """Token ids of ``text`` (its special tokens as written, none added) and, per token,
    whether it starts inside one of the character ``spans``."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    mask = [any(s <= begin < e for s, e in spans) for begin, _ in enc["offset_mapping"]]
    return enc["input_ids"], mask


def split_pair(chosen: list[dict], rejected: list[dict], prompt: list[dict] | None, where: str
               ) -> tuple[list[dict], list[dict], list[dict]]:
    """(prompt, chosen tail, rejected tail) of a conversational preference pair.

    With an explicit ``prompt``, ``chosen``/``rejected`` are the answers, or whole conversations
    that start with the prompt (as in UltraFeedback-binarized); without one, the prompt is
    their longest common leading run of messages (HH-RLHF style).
    """
    if prompt is not None:
        tails = []
        for name, side in (("chosen", chosen), ("rejected", rejected)):
            if side[: len(prompt)] == prompt:
                side = side[len(prompt):]
            elif side and side[0]["role"] != "assistant":
                raise ValueError(f"{where}: {name} starts with other messages than the prompt")
            if not side:
                raise ValueError(f"{where}: {name} has no answer after the prompt")
            tails.append(side)
        return prompt, tails[0], tails[1]
    n = 0
    while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
        n += 1
    if n == 0:
        raise ValueError(f"{where}: chosen and rejected share no leading messages (give a prompt field)")
    return chosen[:n], chosen[n:], rejected[n:]


def drop_oldest_turns(prompt: list[dict], fits) -> tuple[list[dict], int] | None:
    """The shortest cut of ``prompt`` for which ``fits(prompt)`` holds: its oldest messages
    are dropped first, except a leading system message and the last message (the turn being
    answered), which stay. Returns (prompt, number of messages dropped), or None if even the
    shortest prompt does not fit."""
    system = prompt[:1] if prompt and prompt[0]["role"] == "system" else []
    rest = prompt[len(system):]
    for dropped in range(len(rest)):
        candidate = system + rest[dropped:]
        if fits(candidate):
            return candidate, dropped
    return None
