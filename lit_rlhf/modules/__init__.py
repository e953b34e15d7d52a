"""The LightningModules of the RLHF stages."""

from lit_rlhf.modules.ppo import PPOModule
from lit_rlhf.modules.reward import RewardModule
from lit_rlhf.modules.sft import SFTModule

__all__ = ["PPOModule", "RewardModule", "SFTModule"]
