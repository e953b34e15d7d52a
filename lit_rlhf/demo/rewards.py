"""The demo's reward function: its transparent sentiment judge (the classifier stand-in)."""

from __future__ import annotations

import torch

from lit_rlhf.demo.judge import sentiment_score
from lit_rlhf.rewards import RewardFunction


class JudgeReward(RewardFunction):
    """The demo's transparent sentiment judge on prompt + response (see :mod:`lit_rlhf.demo.judge`)."""

    def __init__(self, scale: float = 1.0) -> None:
        """
        Args:
            scale: multiply the judge's score (about [-1, 1]) by this.
        """
        self.scale = scale

    def __call__(self, prompts: list[str], responses: list[str], **fields) -> torch.Tensor:
        return torch.tensor([self.scale * sentiment_score(p + r) for p, r in zip(prompts, responses)])
