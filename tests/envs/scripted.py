"""A scripted environment for the multi-turn tests: whatever the policy says, it answers the
first turns with a fixed text (tokens that a BPE merges across boundaries), then ends the
episode with a reward; importable by class_path from the CLI runs."""

from __future__ import annotations

from lit_rlhf.envs import Environment, Step


class Scripted(Environment):
    """Answers ``observation`` to the first ``turns - 1`` policy turns, then ends with ``reward``;
    ``chat``: the episode is the prompt's conversation and the answer a ``tool`` message;
    ``vary``: prompts of an odd number of characters get one turn fewer (episodes of two lengths)."""

    def __init__(self, observation: str = " the best film of the year", turns: int = 3, reward: float = 1.0,
                 chat: bool = False, vary: bool = False) -> None:
        self.observation, self.turns, self.reward, self.chat, self.vary = observation, turns, reward, chat, vary
        self.seen, self.limit = 0, turns

    def reset(self, row: dict) -> list[dict] | None:
        self.seen = 0
        self.limit = self.turns - (len(row["prompt"]) % 2 if self.vary else 0)
        return row["messages"] if self.chat else None

    def step(self, action: str) -> Step:
        self.seen += 1
        if self.seen >= self.limit:
            return Step(reward=self.reward, done=True)
        answer = [{"role": "tool", "content": self.observation}] if self.chat else self.observation
        return Step(observation=answer, info={"tool_calls": 1.0})
