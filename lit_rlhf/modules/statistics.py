"""What an online-RL step reports: the per-rollout statistics logged to TensorBoard and the
sample rows the ``SampleTable`` callback shows. Built from the step's tensors, nothing computed
that the step needs."""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from dataclasses import dataclass

import torch

from lit_rlhf.metrics import distinct_n, unique_fraction


class Stopwatch:
    """Wall time of a step's phases (``generate``, ``score``, ``learn``), in seconds."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.end: float | None = None
        self.seconds: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def phase(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - t0

    def stop(self) -> None:
        """The step's work is done (what follows is bookkeeping)."""
        self.end = time.perf_counter()

    @property
    def total(self) -> float:
        return (self.end or time.perf_counter()) - self.start


@dataclass
class StepRecord:
    """One online step's results, as the statistics need them.

    ``sampled`` holds every episode (B); ``rollout`` the U episodes updated on (``keep``, their
    indices, or None for all). Tensors: ``scores`` (B,), ``mask``, ``non_score`` (U, Tr),
    ``seq_kl`` (U,), ``global_kl`` a scalar (the mean over all ranks).
    """

    sampled: object
    rollout: object
    keep: torch.Tensor | None
    responses: list[str]
    scores: torch.Tensor
    mask: torch.Tensor
    non_score: torch.Tensor
    seq_kl: torch.Tensor
    global_kl: torch.Tensor
    kl_coef: float
    global_batch: int

    @property
    def kl_in_reward(self) -> bool:
        """False when the rollout has no old or no reference log-probs: the method measures
        the KL in its loss, and the reward carries none."""
        return self.rollout.logprobs is not None and self.rollout.ref_logprobs is not None


def step_statistics(step: StepRecord, end_ids: list[int], watch: Stopwatch, sample_s: float,
                    reward_stats: dict, method_stats: dict, update: dict) -> dict[str, torch.Tensor]:
    """Every scalar an online step logs, by TensorBoard tag (``end_ids``: the end-of-turn ids)."""
    scores, mask, non_score = step.scores, step.mask, step.non_score
    total_s = watch.total
    stats = {
        "env/score": scores.mean(),
        "env/score_std": scores.std() if len(scores) > 1 else torch.zeros(()),
        "objective/kl": step.global_kl,
        "objective/kl_coef": torch.tensor(step.kl_coef),
        # Per episode; the KL part is known for the updated episodes (all, for PPO).
        "objective/non_score_reward": (non_score * mask).sum() / max(len(step.rollout), 1),
        "objective/total_reward": scores.mean() + (non_score * mask).sum() / len(step.sampled),  # before whitening
        "rollout/response_length": step.sampled.action_mask.float().sum(-1).mean(),  # the policy's tokens
        "rollout/eos_rate": step.sampled.ended_with(end_ids).float().mean(),  # the last turn ended
        # Variety: a policy that hacks its reward collapses onto a few stock responses.
        "rollout/distinct_2": torch.tensor(distinct_n(step.responses, 2)),
        "rollout/unique_responses": torch.tensor(unique_fraction(step.responses)),
        "time/generate_s": torch.tensor(watch.seconds["generate"]),  # sampling + log-prob/value/reference passes
        "time/sample_s": torch.tensor(sample_s),  # KV-cached sampling alone
        "time/score_s": torch.tensor(watch.seconds["score"]),
        "time/learn_s": torch.tensor(watch.seconds["learn"]),
        "time/episodes_per_s": torch.tensor(step.global_batch / max(total_s, 1e-9)),
        **{f"rewards/{name}": torch.as_tensor(value, dtype=torch.float32) for name, value in reward_stats.items()},
        **method_stats,
        **update,
    }
    if step.keep is not None:
        stats["rollout/updated_fraction"] = torch.tensor(len(step.rollout) / max(len(step.sampled), 1))
    if not step.kl_in_reward:
        for name in ("objective/kl", "objective/kl_coef", "objective/non_score_reward"):
            stats.pop(name)
    return stats


def sample_rows(prompts: list[str], step: StepRecord, texts: list[str] | None = None) -> list[dict]:
    """One row per sampled response: prompt, response (or ``texts``: multi-turn trajectories,
    observations marked), score and the KL to the reference (known for the episodes updated
    on; NaN for the others)."""
    kls = [float("nan")] * len(step.sampled)
    for i, k in zip(range(len(step.sampled)) if step.keep is None else step.keep.tolist(), step.seq_kl.tolist()):
        kls[i] = k
    return [{"prompt": p, "response": r, "score": s, "kl": k}
            for p, r, s, k in zip(prompts, texts or step.responses, step.scores.tolist(), kls)]
