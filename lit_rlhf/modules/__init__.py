"""One thin LightningModule per method, and the online-RL core they share.

* :class:`SFTModule` (``sft.py``): causal-LM fine-tuning on packed chunks;
* :class:`RewardModule` (``reward.py``): pairwise reward modelling;
* :class:`DPOModule` (``dpo.py``): direct preference optimisation on the same pairs;
* :class:`PPOModule` (``ppo.py``): PPO on the online-RL core;
* :class:`GRPOModule` (``grpo.py``): GRPO, RLOO and REINFORCE++ (critic-free) on the same core;
* :class:`OnlineRLModule` (``online.py``): rollout -> score -> advantages -> minibatch updates;
* ``rollout.py``: KV-cached sampling and scoring of the sampled actions;
* ``base.py``: what every module shares (loading, trainable-only checkpoints, export).
"""

from lit_rlhf.modules.dpo import DPOModule
from lit_rlhf.modules.grpo import GRPOModule
from lit_rlhf.modules.online import OnlineRLModule
from lit_rlhf.modules.ppo import PPOModule
from lit_rlhf.modules.reward import RewardModule
from lit_rlhf.modules.sft import SFTModule

__all__ = ["DPOModule", "GRPOModule", "OnlineRLModule", "PPOModule", "RewardModule", "SFTModule"]
