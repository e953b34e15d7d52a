"""PPOModule: RLHF with PPO on one shared base (policy + value head, reference = adapters off).

PPO is the online-RL core (:mod:`lit_rlhf.modules.online`: rollout, rewards with the KL
penalty, minibatch updates) with a value head on the policy's trunk, GAE as the advantage
estimator and PPO's clipped policy and value losses.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from safetensors.torch import save_file

from lit_rlhf.models import ModelConfig
from lit_rlhf.modules.base import as_config
from lit_rlhf.modules.online import (  # noqa: F401  (the configs are part of PPO's signature)
    KLConfig,
    OnlineRLModule,
    RewardFn,
    SamplingConfig,
    ScoreConfig,
)
from lit_rlhf.modules.rollout import Rollout
from lit_rlhf.modules.update import MinibatchSettings, UpdateConfig
from lit_rlhf.objectives import (
    explained_variance,
    gae,
    masked_mean,
    masked_whiten,
    policy_loss,
    value_loss,
)
from lit_rlhf.optim import OptimConfig


@dataclass
class PPOConfig(MinibatchSettings):
    """The PPO update (the ``ppo:`` block): the shared update loop, plus the value function and GAE."""

    ppo_epochs: int = 4
    """Passes over each rollout batch."""
    clip_range_value: float = 0.2
    """Value clip around the old values."""
    vf_coef: float = 0.1
    """Weight of the value loss."""
    gamma: float = 1.0
    """Discount."""
    lam: float = 0.95
    """GAE lambda."""
    whiten_advantages: bool = True
    """Normalize advantages (masked, across all ranks)."""
    whiten_rewards: bool = False
    """Scale per-token rewards to unit variance without shifting the mean."""

    def __post_init__(self) -> None:
        for name in ("ppo_epochs", "mini_batch_size", "gradient_accumulation_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"ppo.{name} must be >= 1, got {getattr(self, name)}")
        if self.mini_batch_size % self.gradient_accumulation_steps:
            raise ValueError(f"ppo.gradient_accumulation_steps={self.gradient_accumulation_steps} does not divide "
                             f"ppo.mini_batch_size={self.mini_batch_size}")
        self.check_tokens("ppo")

    def update(self) -> UpdateConfig:
        """The shared update loop's settings."""
        return UpdateConfig(epochs=self.ppo_epochs, **self.shared())


class PPOModule(OnlineRLModule):
    """PPO fine-tuning of a causal LM against a reward function.

    Batches come from :class:`~lit_rlhf.data.PromptDataModule`:
    ``{"input_ids", "attention_mask": (B, Tq) left-padded, "prompt": list[str]}``.
    """

    stats_prefix = "ppo"
    uses_value_head = True

    def __init__(
        self,
        lm: ModelConfig,
        reward: RewardFn,
        optim: OptimConfig | None = None,
        sampling: SamplingConfig | None = None,
        ppo: PPOConfig | None = None,
        kl: KLConfig | None = None,
        score: ScoreConfig | None = None,
        judge: RewardFn | None = None,
        rollout_batch_size: int | None = None,
        seed: int = 0,
    ) -> None:
        """
        Args:
            lm: the policy. With LoRA the reference is the same base with adapters disabled;
                without, a frozen copy.
            reward: ``(prompts, responses) -> (B,)`` scores, e.g.
                :class:`~lit_rlhf.rewards.RewardModelReward`.
            optim: optimizer and schedule (one scheduler step per rollout).
            sampling: response sampling.
            ppo: the PPO update.
            kl: KL penalty and controller.
            score: score shaping (baseline, clip, missing-EOS penalty).
            judge: an optional second scorer reported during validation (e.g. the demo's
                gold judge), never used for training.
            rollout_batch_size: prompts per rollout per device; checked against
                ``ppo.mini_batch_size`` (the CLI links it from ``data.batch_size``).
            seed: seed of sampling and minibatch shuffling (offset by the rank).
        """
        ppo_config = as_config(PPOConfig, ppo) or PPOConfig()
        if rollout_batch_size is not None and rollout_batch_size % ppo_config.mini_batch_size:
            raise ValueError(f"ppo.mini_batch_size={ppo_config.mini_batch_size} does not divide the rollout "
                             f"batch size data.batch_size={rollout_batch_size}")
        super().__init__(lm, reward, ppo_config.update(), optim=optim, sampling=sampling, kl=kl, score=score,
                         judge=judge, seed=seed)
        self.ppo = ppo_config
        self.save_hyperparameters(ignore=["reward", "judge"])

    # 3. advantages: GAE on the value head, whitened with statistics shared by all ranks
    def advantages(self, rollout: Rollout, scores: torch.Tensor, rewards: torch.Tensor, mask: torch.Tensor):
        if self.ppo.whiten_rewards:
            rewards = masked_whiten(rewards, mask, shift_mean=False, group_sum=self._sum_ranks)
        advantages, returns = gae(rewards, rollout.values, mask, self.ppo.gamma, self.ppo.lam)
        if self.ppo.whiten_advantages:
            advantages = masked_whiten(advantages, mask, group_sum=self._sum_ranks)
        return advantages, returns

    def loss_weight(self, sub: Rollout) -> torch.Tensor:
        """What the loss of ``sub`` is a mean over: its action tokens (a micro-batch's share)."""
        return sub.action_mask.sum()

    # 4. the minibatch loss: clipped policy + clipped value - entropy bonus
    def loss(self, sub: Rollout, advantages: torch.Tensor, returns: torch.Tensor):
        mask = sub.action_mask.float()
        # The entropy is a logged statistic; it needs a graph only when it is in the loss.
        entropy_mode = "grad" if self.ppo.entropy_coef else "detached"
        logprobs, values, entropy = self.evaluate(self.policy, sub, with_values=True, entropy=entropy_mode)
        pg_loss, pstats = policy_loss(logprobs, sub.logprobs, advantages, mask, self.ppo.clip_range)
        vf_loss, vstats = value_loss(values, sub.values, returns, mask, self.ppo.clip_range_value)
        mean_entropy = masked_mean(entropy, mask)
        loss = pg_loss + self.ppo.vf_coef * vf_loss - self.ppo.entropy_coef * mean_entropy
        stats = {
            "loss_policy": pg_loss.detach(),
            "loss_value": vf_loss.detach(),
            "loss_total": loss.detach(),
            "entropy": mean_entropy.detach(),
            "approx_kl": pstats.approx_kl,
            "clipfrac_policy": pstats.clipfrac,
            "clipfrac_value": vstats.clipfrac,
            "ratio_mean": pstats.ratio_mean,
            "ratio_max": pstats.ratio_max,
            "explained_variance": explained_variance(values.detach(), returns, mask),
        }
        return loss, stats

    def on_train_end(self) -> None:
        path = self.export_dir  # a collective under DDP: every rank asks
        super().on_train_end()  # adapter (LoRA) or full policy, with the tokenizer
        head = self.export_state_dict(self.policy.value_head) or self.policy.value_head.state_dict()
        if self.trainer.is_global_zero:
            save_file({k: v.detach().cpu().contiguous() for k, v in head.items()}, str(path / "value_head.safetensors"))
