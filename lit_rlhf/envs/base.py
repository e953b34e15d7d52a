"""The environment protocol of multi-turn episodes."""

from __future__ import annotations

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

    The rollout calls ``env.new_episode()`` once per episode, then ``reset(row)`` with the
    prompt's data row (``{"prompt": text, "messages": ... (chat prompts), **fields}``), then
    ``step(text)`` after every policy turn until ``done`` or the episode's turn or token budget
    runs out. An episode's environment is made by its class from the configured one's
    constructor arguments, never deep-copied: what ``__init__`` builds (a lock, a counter) is
    the episode's own, what it is given (a client, a model, a shared lock) is shared by every
    episode. So keep ``__init__`` cheap, and pass heavy things in (or override
    :meth:`new_episode`).
    """

    def __new__(cls, *args, **kwargs):
        # The constructor arguments, for new_episode (a deep copy fails on locks and clients, and
        # would duplicate a model). LightningCLI's class_path/init_args construction passes here too.
        self = super().__new__(cls)
        self._init_args = (args, kwargs)
        return self

    def new_episode(self) -> Environment:
        """A fresh environment for one episode: ``type(self)(*args, **kwargs)`` with this one's
        constructor arguments (the objects themselves, shared; see the class docstring)."""
        init = self.__dict__.get("_init_args")
        if init is None:
            raise TypeError(f"{type(self).__name__}: its constructor arguments were not recorded (does it define "
                            "__new__ without calling Environment.__new__?): override new_episode")
        args, kwargs = init
        return type(self)(*args, **kwargs)

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
