"""torchmetrics for the stages: summed states, so values are exact across DDP ranks."""

from __future__ import annotations

import torch
from torchmetrics import Metric


class PairMetrics(Metric):
    """Reward-model metrics over preference pairs.

    ``compute()`` returns accuracy (r_chosen > r_rejected strictly: ties count as wrong),
    mean margin (r_chosen - r_rejected), and the mean and std of all scores (both sides),
    which the export stores for reward normalization in PPO.
    """

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        for name in ("correct", "margin", "score", "score_sq", "pairs"):
            self.add_state(name, default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> None:
        """r_chosen, r_rejected: (B,) scores."""
        rc, rr = r_chosen.detach().double(), r_rejected.detach().double()
        self.correct += (rc > rr).sum()
        self.margin += (rc - rr).sum()
        self.score += rc.sum() + rr.sum()
        self.score_sq += (rc**2).sum() + (rr**2).sum()
        self.pairs += rc.numel()

    def compute(self) -> dict[str, torch.Tensor]:
        n = self.pairs.clamp(min=1)
        mean = self.score / (2 * n)
        var = (self.score_sq / (2 * n) - mean**2).clamp(min=0)
        return {
            "accuracy": (self.correct / n).float(),
            "margin": (self.margin / n).float(),
            "reward_mean": mean.float(),
            "reward_std": var.sqrt().float(),
        }
