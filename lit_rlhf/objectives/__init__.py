"""The math of every method, as pure functions of tensors (no modules, no Trainer).

One file per concept:

* :mod:`~lit_rlhf.objectives.masked`: masked sum / mean / variance / whitening;
* :mod:`~lit_rlhf.objectives.logprobs`: per-token log-probs and entropies from logits;
* :mod:`~lit_rlhf.objectives.kl`: KL estimators (k1, abs, mse, k3) and coefficient controllers;
* :mod:`~lit_rlhf.objectives.shaping`: per-token rewards (KL penalty + score at the last token);
* :mod:`~lit_rlhf.objectives.advantages`: advantage estimators (GAE; GRPO, RLOO, REINFORCE++ on groups);
* :mod:`~lit_rlhf.objectives.policy`: clipped policy and value losses;
* :mod:`~lit_rlhf.objectives.lm`: summed cross-entropy and the causal-LM loss;
* :mod:`~lit_rlhf.objectives.preference`: the pairwise reward-model loss and the DPO family.
"""

from lit_rlhf.objectives.advantages import (
    gae,
    group_advantages,
    informative_groups,
    reinforce_baseline_advantages,
    rloo_advantages,
    zero_std_groups,
)
from lit_rlhf.objectives.kl import AdaptiveKLController, FixedKLController, KLController, kl_penalty
from lit_rlhf.objectives.lm import IGNORE_INDEX, causal_lm_loss, cross_entropy_sum
from lit_rlhf.objectives.logprobs import (
    entropy_from_logits,
    head_logprobs,
    logprobs_and_entropy,
    logprobs_from_logits,
)
from lit_rlhf.objectives.masked import (
    explained_variance,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
)
from lit_rlhf.objectives.policy import policy_loss, value_loss
from lit_rlhf.objectives.preference import dpo_loss, pairwise_loss
from lit_rlhf.objectives.shaping import compute_rewards

__all__ = [
    "IGNORE_INDEX",
    "AdaptiveKLController",
    "FixedKLController",
    "KLController",
    "causal_lm_loss",
    "compute_rewards",
    "cross_entropy_sum",
    "dpo_loss",
    "entropy_from_logits",
    "explained_variance",
    "gae",
    "group_advantages",
    "head_logprobs",
    "kl_penalty",
    "logprobs_and_entropy",
    "logprobs_from_logits",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "pairwise_loss",
    "policy_loss",
    "reinforce_baseline_advantages",
    "rloo_advantages",
    "value_loss",
    "informative_groups",
    "zero_std_groups",
]
