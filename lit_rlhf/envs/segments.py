"""An episode's observations as token segments: tokenized once, never re-tokenized with the
text around them (re-tokenizing decoded text can merge tokens across a boundary, and the
training pass would then score other tokens than the sampler drew)."""

from __future__ import annotations

from lit_rlhf.data.chat import render, template_of


class Transcript:
    """One episode's conversation so far, for rendering observations as token segments.

    Plain-text episodes: an observation is text, tokenized on its own (no special tokens added).
    Chat episodes: an observation is messages (e.g. a ``tool`` message); its segment is what
    the chat template adds to the conversation after the policy's turn: the template's end of
    that turn (unless the policy sampled it), the observation's messages and the next
    assistant header. That holds only for templates that render a conversation's prefixes as
    prefixes of the whole: one that re-renders earlier turns once a message is added is a
    one-line error naming the turn (name another with ``model.init_args.lm.chat_template``).
    """

    def __init__(self, tokenizer, messages: list[dict] | None = None, tools: list | None = None) -> None:
        self.tokenizer, self.tools = tokenizer, tools
        self.messages = list(messages) if messages is not None else None
        self.template = template_of(tokenizer) if messages is not None else None
        self.text = self._render(add_generation_prompt=True) if messages is not None else None

    def _render(self, add_generation_prompt: bool) -> str:
        return render(self.tokenizer, self.messages, self.template, add_generation_prompt, tools=self.tools)

    def prompt_tokens(self) -> list[int]:
        """The rendered conversation's tokens (the template writes its own special tokens)."""
        return self.tokenizer(self.text, add_special_tokens=False)["input_ids"]

    def observation_tokens(self, action_ids: list[int], observation: str | list[dict], turn: int) -> list[int]:
        """The segment that follows the policy's turn ``turn`` (1-based), whose tokens were ``action_ids``."""
        if isinstance(observation, str):
            return self.tokenizer(observation, add_special_tokens=False)["input_ids"]
        if self.messages is None:
            raise ValueError(f"turn {turn}: the environment answered with messages, but the episode's prompt is "
                             "plain text (no chat template renders them): answer with text")
        content = self.tokenizer.decode(action_ids, skip_special_tokens=True)
        self.messages.append({"role": "assistant", "content": content})
        before = self._render(add_generation_prompt=False)
        if not before.startswith(self.text):
            raise ValueError(self._prefix_error(turn, "the policy's turn"))
        found = before.find(content.strip(), len(self.text))
        if found < 0:
            raise ValueError(f"turn {turn}: the chat template does not render the assistant's text as sampled, so "
                             "its tokens cannot stay as sampled (set model.init_args.lm.chat_template)")
        cut = found + len(content.strip())
        self.messages.extend(observation)
        after = self._render(add_generation_prompt=True)
        if not after.startswith(before):
            raise ValueError(self._prefix_error(turn, "the environment's message"))
        segment = after[cut:]
        # What the policy sampled after its text (e.g. the end-of-turn token) is already in the sequence.
        sampled = self.tokenizer.decode(action_ids, skip_special_tokens=False)
        tail = sampled[sampled.rfind(content.strip()) + len(content.strip()):] if content.strip() else sampled
        if tail and segment.startswith(tail):
            segment = segment[len(tail):]
        self.text = after
        return self.tokenizer(segment, add_special_tokens=False)["input_ids"]

    def _prefix_error(self, turn: int, what: str) -> str:
        return (f"turn {turn}: adding {what} changes how the chat template renders the earlier turns (the "
                "rendering before it is not a prefix of the rendering after it), so the tokens the policy "
                "sampled would not be the tokens it is trained on: set model.init_args.lm.chat_template to a "
                "training template that only appends (e.g. chatml)")
