"""Metrics for the stages: torchmetrics with summed states (exact across DDP ranks), and the
variety statistics of sampled text (distinct-n, unique responses) that show a policy
collapsing onto a few stock answers."""

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


def distinct_n(texts: list[str], n: int = 2) -> float:
    """Distinct-n (Li et al. 2016): unique word n-grams over all word n-grams of ``texts``.

    Words are white-space separated; a text shorter than n words adds no n-gram. 1.0 when no
    n-gram repeats, near 0 when every response is the same stock phrase; 0.0 when there is no
    n-gram at all.
    """
    grams = [tuple(words[i : i + n]) for words in (t.split() for t in texts) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def unique_fraction(texts: list[str]) -> float:
    """The fraction of ``texts`` that are distinct after stripping (1.0: no two alike)."""
    return len({t.strip() for t in texts}) / len(texts) if texts else 0.0
