"""A scripted environment for the multi-turn tests: whatever the policy says, it answers the
first turns with a fixed text (tokens that a BPE merges across boundaries), then ends the
episode with a reward; importable by class_path from the CLI runs."""

from __future__ import annotations

from lit_rlhf.envs import Environment, Step


class Scripted(Environment):
    """Answers ``observation`` to the first ``turns - 1`` policy turns, then ends with ``reward``."""

    def __init__(self, observation: str = " the best film of the year", turns: int = 3, reward: float = 1.0) -> None:
        self.observation, self.turns, self.reward = observation, turns, reward
        self.seen = 0

    def reset(self, row: dict) -> None:
        self.seen = 0

    def step(self, action: str) -> Step:
        self.seen += 1
        if self.seen >= self.turns:
            return Step(reward=self.reward, done=True)
        return Step(observation=self.observation, info={"tool_calls": 1.0})
