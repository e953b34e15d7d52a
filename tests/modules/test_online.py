"""The online-RL core is reusable: a critic-free method is two methods on top of it.

The method below (sequence-level REINFORCE with a batch-mean baseline and the clipped ratio)
is a test double, not a shipped method: it shows that the rollout loop, the reference pass,
the update loop and the checkpointed state work without a value head.
"""

from __future__ import annotations

import lightning as L
import pytest

from lit_rlhf.data import PromptDataModule
from lit_rlhf.metrics import distinct_n, unique_fraction
from lit_rlhf.models import LoraSettings, ModelConfig
from lit_rlhf.modules import OnlineRLModule
from lit_rlhf.modules.online import SamplingConfig
from lit_rlhf.modules.rollout import evaluate_actions
from lit_rlhf.modules.update import UpdateConfig
from lit_rlhf.objectives import policy_loss
from lit_rlhf.optim import OptimConfig
from tests.conftest import TINY_LLAMA
from tests.modules.ppo_helpers import LetterReward


class BaselineReinforce(OnlineRLModule):
    stats_prefix = "pg"
    uses_value_head = False

    def __init__(self, lm: ModelConfig, reward) -> None:
        super().__init__(lm, reward, UpdateConfig(epochs=1, mini_batch_size=4),
                         optim=OptimConfig(lr=1e-3, min_lr_ratio=1.0),
                         sampling=SamplingConfig(min_new_tokens=3, max_new_tokens=6))
        self.seen: list[dict] = []

    def advantages(self, rollout, scores, rewards, mask):
        # Every token of a response gets its sequence's centred score; no value, no returns.
        return (scores - scores.mean())[:, None] * mask, None

    def loss(self, sub, advantages, returns):
        assert returns is None and sub.values is None
        logprobs, values, _ = evaluate_actions(self.policy, sub, with_values=False)
        assert values is None
        loss, stats = policy_loss(logprobs, sub.logprobs, advantages, sub.response_mask.float(), 0.2)
        out = {"loss_total": loss.detach(), "ratio_mean": stats.ratio_mean, "ratio_max": stats.ratio_max,
               "approx_kl": stats.approx_kl}
        self.seen.append({k: float(v) for k, v in out.items()})
        return loss, out


def test_a_critic_free_method_runs_on_the_shared_core(tmp_path):
    lm = ModelConfig(arch=TINY_LLAMA, tokenizer="demo",
                     lora=LoraSettings(r=8, alpha=16, dropout=0.0, target_modules="all-linear"))
    module = BaselineReinforce(lm, LetterReward())
    data = PromptDataModule("demo", batch_size=8, val_size=8, tokenizer=module.tokenizer)
    trainer = L.Trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=0, accelerator="cpu",
                        default_root_dir=tmp_path, logger=False, enable_progress_bar=False,
                        enable_checkpointing=False)
    trainer.fit(module, data)

    assert module.policy.value_head is None  # critic-free: no head built
    assert module.rollouts_done == 2
    assert trainer.global_step == 4  # 2 rollouts x (8 episodes / minibatches of 4)
    # The first minibatch of the first rollout is exactly on-policy: ratio 1, KL 0.
    first = module.seen[0]
    assert first["ratio_mean"] == 1.0 and first["ratio_max"] == 1.0 and first["approx_kl"] == 0.0
    # The statistics are logged under the method's own prefix.
    assert {"pg/loss_total", "pg/ratio_mean", "pg/epochs", "env/score"} <= set(trainer.callback_metrics)
    # Variety of the last rollout's responses, as the metrics compute it from the decoded text.
    responses = [s["response"] for s in module.last_samples]
    metrics = trainer.callback_metrics
    assert float(metrics["rollout/distinct_2"]) == pytest.approx(distinct_n(responses, 2), abs=1e-6)
    assert float(metrics["rollout/unique_responses"]) == pytest.approx(unique_fraction(responses), abs=1e-6)


def test_a_plain_callable_is_a_reward_function_and_names_itself(tmp_path):
    import torch

    from lit_rlhf.rewards import RewardFunction, as_reward_function

    def letters(prompts, responses):
        return torch.tensor([float(len(r)) for r in responses])

    wrapped = as_reward_function(letters)
    assert isinstance(wrapped, RewardFunction) and wrapped.display_name == "letters"
    assert wrapped.statistics() == {} and wrapped.fields == () and not wrapped.wants_messages
    assert as_reward_function(wrapped) is wrapped  # wrapped once
    with pytest.raises(ValueError, match="expected a RewardFunction or a callable"):
        as_reward_function(3)
    lm = ModelConfig(arch=TINY_LLAMA, tokenizer="demo", lora=LoraSettings(r=4, alpha=8, dropout=0.0))
    module = BaselineReinforce(lm, letters)
    data = PromptDataModule("demo", batch_size=8, val_size=8, tokenizer=module.tokenizer)
    L.Trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=0, accelerator="cpu", default_root_dir=tmp_path,
              logger=False, enable_progress_bar=False, enable_checkpointing=False).fit(module, data)
    assert module.rollouts_done == 1
    assert [s["score"] for s in module.last_samples] == [float(len(s["response"])) for s in module.last_samples]
