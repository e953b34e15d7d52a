"""GRPOModule: critic-free online RL (GRPO, RLOO, REINFORCE++) on the shared rollout loop.

The online-RL core (:mod:`lit_rlhf.modules.online`) samples ``num_generations`` responses per
prompt (each prompt prefilled once, its KV cache repeated), scores them, and runs the update
loop. This module adds what makes it critic-free: no value head, an advantage from each
response's group (:mod:`lit_rlhf.objectives.advantages`), the clipped policy loss with
clip-higher and a choice of aggregation, and the KL to the reference as a loss term (k3).

Batch arithmetic, per rank: ``data.batch_size`` prompts x ``num_generations`` = the rollout's
completions, all of one prompt's group on the same rank (groups are never split). Each
rollout is used for ``num_iterations`` passes of ``mini_batch_size`` completions per
optimizer step (default: all of them, one step per pass).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from lit_rlhf.envs import Environment
from lit_rlhf.models import ModelConfig
from lit_rlhf.modules.base import as_config
from lit_rlhf.modules.episodes import EpisodeConfig
from lit_rlhf.modules.online import (  # noqa: F401  (the configs are part of GRPO's signature)
    KLConfig,
    OnlineRLModule,
    RewardFn,
    SamplingConfig,
    ScoreConfig,
)
from lit_rlhf.modules.rollout import Rollout
from lit_rlhf.modules.update import UpdateConfig
from lit_rlhf.objectives import (
    group_advantages,
    informative_groups,
    kl_penalty,
    masked_mean,
    policy_loss,
    reinforce_baseline_advantages,
    rloo_advantages,
    zero_std_groups,
)
from lit_rlhf.objectives.masked import Aggregation, aggregate
from lit_rlhf.optim import OptimConfig


@dataclass
class GRPOConfig:
    """The group estimator and the critic-free update."""

    num_generations: int = 8
    """Responses sampled per prompt (the group), >= 2."""
    advantage: Literal["grpo", "rloo", "reinforce_baseline"] = "grpo"
    """``grpo``: reward minus the group mean, scaled by ``scale``; ``rloo``: minus the mean of
    the other G - 1; ``reinforce_baseline`` (REINFORCE++): minus the group mean, then
    whitened over the rank's batch."""
    scale: Literal["group", "batch", "none"] = "group"
    """GRPO's std normalisation: the group's std, the rank's batch std, or none (Dr. GRPO)."""
    num_iterations: int = 1
    """Update passes over each rollout (the ratio to the rollout-time policy is clipped)."""
    mini_batch_size: int | None = None
    """Completions per optimizer step, per device; None: the whole rollout (one step per pass)."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per minibatch."""
    mini_batch_tokens: int | None = None
    """At most this many prompt + response tokens in one forward: update micro-batches (after
    the ``gradient_accumulation_steps`` cut) and the no-grad passes are cut further by tokens (an
    episode longer than that alone). None: derived from the model's shape and the device's
    memory (``lit_rlhf.modules.update.auto_pass_tokens``)."""
    clip_range: float = 0.2
    """Lower (and, without ``clip_range_high``, upper) ratio clip epsilon."""
    clip_range_high: float | None = None
    """Upper ratio clip epsilon (DAPO's clip-higher, e.g. 0.28); None: ``clip_range``."""
    loss_aggregation: Aggregation = "seq_mean_token_mean"
    """``token_mean`` (DAPO), ``seq_mean_token_mean`` (GRPO) or ``seq_mean_token_sum`` (Dr. GRPO)."""
    kl_loss_coef: float = 0.04
    """Weight of the k3 KL-to-reference loss term; 0 skips the reference pass entirely."""
    mask_truncated: bool = False
    """Leave responses that did not end with EOS (cut at max_new_tokens) out of the loss."""
    max_grad_norm: float | None = 1.0
    """Gradient norm clip; None: off."""
    ratio_threshold: float | None = 10.0
    """Skip (and count) a minibatch whose mean ratio exceeds this; None: off."""
    packed: bool = True
    """Padding-free scoring and update passes when they run fewer tokens than padded rows with
    each group's prompt run once (see ``evaluate_actions``)."""
    skip_zero_std_groups: bool = False
    """Leave groups whose rewards are all equal out of the update (DAPO's dynamic sampling,
    without re-sampling): their advantages are exactly 0, so their policy gradient is too, and
    their reference and update passes are saved. The loss is then averaged over the other
    groups only, and the left-out groups' KL term is dropped. Needs per-group advantages
    (``grpo`` with ``scale: group`` or ``none``, or ``rloo``) and the KL in the loss."""

    def __post_init__(self) -> None:
        if self.num_generations < 2:
            raise ValueError(f"grpo.num_generations must be >= 2 (a group needs a baseline), got {self.num_generations}")
        if self.num_iterations < 1:
            raise ValueError(f"grpo.num_iterations must be >= 1, got {self.num_iterations}")
        if self.mini_batch_size is not None and self.mini_batch_size < 1:
            raise ValueError(f"grpo.mini_batch_size must be >= 1, got {self.mini_batch_size}")
        UpdateConfig(mini_batch_tokens=self.mini_batch_tokens,
                     gradient_accumulation_steps=self.gradient_accumulation_steps).check_tokens("grpo")
        if not self.kl_loss_coef >= 0:
            raise ValueError(f"grpo.kl_loss_coef must be >= 0, got {self.kl_loss_coef}")
        for name in ("clip_range", "clip_range_high"):
            value = getattr(self, name)
            if value is not None and not value >= 0:
                raise ValueError(f"grpo.{name} must be >= 0, got {value}")
        if self.skip_zero_std_groups and (self.advantage == "reinforce_baseline" or self.scale == "batch"):
            # Batch statistics would change with the groups left out, and with them every advantage.
            raise ValueError(f"grpo.skip_zero_std_groups needs per-group advantages (advantage grpo with scale "
                             f"group or none, or rloo), got advantage {self.advantage} with scale {self.scale}")

    def update(self, prompts: int | None) -> UpdateConfig:
        """The shared update loop's settings for rollouts of ``prompts`` prompts per device
        (``data.batch_size``), checked in GRPO's own terms."""
        completions = prompts * self.num_generations if prompts is not None else None
        mini = self.mini_batch_size or completions
        if mini is None:
            raise ValueError("GRPOModule needs rollout_batch_size (data.batch_size) or grpo.mini_batch_size")
        rollout = (f"the rollout's {completions} completions (data.batch_size={prompts} prompts x "
                   f"grpo.num_generations={self.num_generations})")
        if completions is not None and completions % mini:
            raise ValueError(f"grpo.mini_batch_size={mini} does not divide {rollout}")
        if mini % self.gradient_accumulation_steps:
            raise ValueError(f"grpo.gradient_accumulation_steps={self.gradient_accumulation_steps} does not divide "
                             f"the minibatch of {mini} completions")
        return UpdateConfig(epochs=self.num_iterations, mini_batch_size=mini,
                            gradient_accumulation_steps=self.gradient_accumulation_steps,
                            mini_batch_tokens=self.mini_batch_tokens, clip_range=self.clip_range,
                            max_grad_norm=self.max_grad_norm, ratio_threshold=self.ratio_threshold,
                            packed=self.packed)


class GRPOModule(OnlineRLModule):
    """GRPO / RLOO / REINFORCE++ fine-tuning of a causal LM against (rule-based) rewards.

    Batches come from :class:`~lit_rlhf.data.PromptDataModule`, with the row ``fields`` the
    reward functions ask for: ``{"input_ids", "attention_mask": (B, Tq), "prompt", "fields"}``.
    Logs ``grpo/{loss_policy,loss_kl,kl,loss_total,entropy,approx_kl,clipfrac,ratio_mean,
    ratio_max}``, ``rollout/{zero_std_groups,group_reward_std,truncated}``, ``env/score``,
    ``rewards/*`` (each reward function's mean and statistics, e.g. the answer accuracy) and
    ``val/{score,accuracy,kl,response_length}``; with an ``env``, multi-turn episodes and
    ``episode/{turns,tool_calls,tool_errors,tool_use,observation_tokens,cut,env_reward}``
    (means per episode), ``rollout/sampler_logprob_gap``.
    """

    stats_prefix = "grpo"
    uses_value_head = False

    def __init__(
        self,
        lm: ModelConfig,
        reward: RewardFn,
        optim: OptimConfig | None = None,
        sampling: SamplingConfig | None = None,
        grpo: GRPOConfig | None = None,
        kl: KLConfig | None = None,
        score: ScoreConfig | None = None,
        judge: RewardFn | None = None,
        rollout_batch_size: int | None = None,
        seed: int = 0,
        env: Environment | None = None,
        episodes: EpisodeConfig | None = None,
    ) -> None:
        """
        Args:
            lm: the policy (LoRA: the reference is the base with adapters off; full: a frozen copy).
            reward: ``(prompts, responses, **fields) -> (B,)``, e.g.
                :class:`~lit_rlhf.rewards.ExactAnswerReward` or :class:`~lit_rlhf.rewards.WeightedRewards`.
            optim: optimizer and schedule (one scheduler step per rollout).
            sampling: response sampling (keep top_k 0, top_p 1 for an unbiased KL).
            grpo: the group estimator and the update.
            kl: a KL penalty in the reward, as PPO has; off by default (``init_coef: 0``),
                GRPO puts the KL in the loss (``grpo.kl_loss_coef``).
            score: score shaping (baseline, clip, missing-EOS penalty).
            judge: an optional second scorer reported during validation only.
            rollout_batch_size: prompts per rollout per device (the CLI links ``data.batch_size``).
            seed: seed of sampling and minibatch shuffling (offset by the rank).
            env: multi-turn episodes: an environment (e.g. :class:`~lit_rlhf.envs.ToolEnvironment`)
                answers each policy turn; the reward functions score the final answer (the
                policy's last turn) and the environment's reward is added. None: one response.
            episodes: the episodes' turn and token budget (with ``env``); each turn samples up to
                ``sampling.max_new_tokens`` tokens.
        """
        g = as_config(GRPOConfig, grpo) or GRPOConfig()
        kl = as_config(KLConfig, kl) or KLConfig(init_coef=0.0, adaptive=False)
        super().__init__(lm, reward, g.update(rollout_batch_size), optim=optim, sampling=sampling, kl=kl,
                         score=score, judge=judge, seed=seed, env=env, episodes=episodes)
        self.grpo = g
        self.num_generations = g.num_generations
        if g.skip_zero_std_groups and self._kl_in_reward():
            # The KL penalty in the reward makes equal scores unequal returns.
            raise ValueError("grpo.skip_zero_std_groups needs the KL in the loss (kl.init_coef: 0, adaptive: false)")
        self.save_hyperparameters(ignore=["reward", "judge", "env"])

    def _kl_in_reward(self) -> bool:
        return self.kl_config.adaptive or self.kl_config.init_coef > 0

    def needs_old_logprobs(self, episodes: int) -> bool:
        # One optimizer step on these episodes: the policy has not moved when the loss runs, so
        # the loss's own detached log-probs are the old ones (ratio 1) and the pass is saved.
        one_step = self.grpo.num_iterations == 1 and episodes <= self.update_config.mini_batch_size
        return not one_step or self._kl_in_reward()

    def episodes_to_update(self, scores: torch.Tensor) -> torch.Tensor | None:
        """With ``skip_zero_std_groups``: the episodes of the groups whose rewards differ.

        Under DDP every rank must run the same number of minibatches, so each rank keeps as
        many groups as the rank with the most informative ones, filling up with left-out groups
        (zero advantage) in their original order.
        """
        if not self.grpo.skip_zero_std_groups:
            return None
        g = self.num_generations
        informative = informative_groups(scores, g)  # (U,)
        wanted = informative.sum()
        if self._trainer is not None and self.trainer.world_size > 1:
            wanted = self.trainer.strategy.all_gather(wanted).max()
        chosen = torch.argsort((~informative).int(), stable=True)[: int(wanted)].sort().values
        return (chosen[:, None] * g + torch.arange(g, device=scores.device)).flatten()

    def needs_reference(self) -> bool:
        return self.grpo.kl_loss_coef > 0 or self._kl_in_reward()

    # 3. advantages: each response against its group, the same for all its tokens
    def advantages(self, rollout: Rollout, scores: torch.Tensor, rewards: torch.Tensor, mask: torch.Tensor):
        returns = (rewards * mask).sum(-1)  # the score, plus the KL penalty when it is in the reward
        g, estimator = self.num_generations, self.grpo.advantage
        if estimator == "grpo":
            adv = group_advantages(returns, g, self.grpo.scale)
        elif estimator == "rloo":
            adv = rloo_advantages(returns, g)
        else:
            adv = reinforce_baseline_advantages(returns, g)
        return adv[:, None] * mask, None

    def rollout_statistics(self, rollout: Rollout, scores: torch.Tensor) -> dict[str, torch.Tensor]:
        groups = scores.float().view(-1, self.num_generations)
        return {
            "rollout/zero_std_groups": torch.tensor(float(zero_std_groups(scores, self.num_generations))),
            "rollout/group_reward_std": groups.std(dim=1).mean(),
            "rollout/truncated": (~rollout.ended_with(self.end_of_turn_ids)).float().mean(),
        }

    def loss_mask(self, sub: Rollout) -> torch.Tensor:
        """(B, Tr) the tokens the loss averages over: the actions (of responses that ended, with
        ``mask_truncated``: one cut at max_new_tokens has no reward signal of its own ending)."""
        mask = sub.action_mask.float()
        if self.grpo.mask_truncated:
            mask = mask * sub.ended_with(self.end_of_turn_ids).float()[:, None]
        return mask

    def loss_weight(self, sub: Rollout) -> torch.Tensor:
        """What the loss of ``sub`` is a mean over (a micro-batch's share): its loss tokens for
        ``token_mean``, its episodes for the per-sequence aggregations."""
        if self.grpo.loss_aggregation == "token_mean":
            return self.loss_mask(sub).sum()
        return super().loss_weight(sub)

    # 4. the minibatch loss: clipped policy loss + kl_loss_coef * k3 KL to the reference
    def loss(self, sub: Rollout, advantages: torch.Tensor, returns: None):
        g = self.grpo
        mask = self.loss_mask(sub)
        logprobs, _, entropy = self.evaluate(self.policy, sub, entropy="detached")
        old = sub.logprobs if sub.logprobs is not None else logprobs.detach()
        pg_loss, pstats = policy_loss(logprobs, old, advantages, mask, g.clip_range, g.clip_range_high,
                                      g.loss_aggregation)
        loss, stats = pg_loss, {"loss_policy": pg_loss.detach()}
        if g.kl_loss_coef > 0:
            kl = kl_penalty(logprobs, sub.ref_logprobs, "k3")  # (B, T), non-negative, unbiased
            kl_loss = aggregate(kl, mask, g.loss_aggregation)
            loss = loss + g.kl_loss_coef * kl_loss
            stats.update(loss_kl=kl_loss.detach(), kl=masked_mean(kl.detach(), mask))
        stats.update(loss_total=loss.detach(), entropy=masked_mean(entropy, mask), approx_kl=pstats.approx_kl,
                     clipfrac=pstats.clipfrac, ratio_mean=pstats.ratio_mean, ratio_max=pstats.ratio_max)
        return loss, stats
