"""The environment protocol of multi-turn episodes."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field


@dataclass
class Step:
    """What the environment answers to one policy turn."""

    observation: str | list[dict] | None = None
    """The next observation: text (plain-text episodes), messages such as ``[{"role": "tool",
    "content": ...}]`` (chat episodes), or None (nothing to add)."""
    reward: float = 0.0
    """Added to the episode's return (the environment's reward; reward functions add theirs
    on the final answer)."""
    done: bool = False
    """The episode is over: the policy gets no further turn."""
    info: dict[str, float] = field(default_factory=dict)
    """Counts to log per episode, summed over its turns (``tool_calls``, ``tool_errors``, ...)."""


class Environment:
    """One episode's world. Subclass and override :meth:`step` (and :meth:`reset`).

    The rollout calls ``env.new_episode()`` once per episode (a deep copy of the configured
    environment), then ``reset(row)`` with the prompt's data row (``{"prompt": text, "messages":
    ... (chat prompts), **fields}``), then ``step(text)`` after every policy turn until ``done``
    or the episode's turn or token budget runs out.
    """

    def new_episode(self) -> Environment:
        """A fresh environment for one episode (default: a deep copy of this one)."""
        return copy.deepcopy(self)

    def reset(self, row: dict) -> str | list[dict] | None:
        """The first observation: None keeps the data module's prompt as it is (tokenized
        there); text is tokenized as the prompt; messages are rendered by the chat template
        with the generation prompt (and :meth:`tool_schemas`)."""
        return None

    def step(self, action: str) -> Step:
        """React to the text of the policy's turn (special tokens dropped)."""
        raise NotImplementedError

    def stop_strings(self) -> list[str]:
        """Strings that end a policy turn besides EOS (e.g. a tool call's closing tag)."""
        return []

    def tool_schemas(self) -> list | None:
        """Tools for the chat template's ``tools=`` (callables or JSON schemas); None: none."""
        return None
