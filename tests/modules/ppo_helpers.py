"""Shared by the PPO, rollout, prompt-data and online-core tests: a tiny PPOModule and its data."""

from __future__ import annotations

import torch

from lit_rlhf.data import PromptDataModule
from lit_rlhf.models import LoraSettings, ModelConfig
from lit_rlhf.modules import PPOModule
from lit_rlhf.modules.ppo import PPOConfig, SamplingConfig
from lit_rlhf.optim import OptimConfig
from lit_rlhf.rewards import RewardFunction
from tests.conftest import TINY_LLAMA

LORA = LoraSettings(r=8, alpha=16, dropout=0.1, target_modules="all-linear")


class LetterReward(RewardFunction):
    """How often ``letter`` occurs in the response: dense enough to learn in seconds."""

    def __init__(self, letter: str = "e") -> None:
        self.letter = letter

    def __call__(self, prompts, responses):
        return torch.tensor([float(r.count(self.letter)) for r in responses])


class BrokenReward(RewardFunction):
    def __init__(self, kind: str) -> None:
        self.kind = kind

    def __call__(self, prompts, responses):
        if self.kind == "nan":
            return torch.full((len(responses),), float("nan"))
        return torch.zeros(len(responses), 2)


def make_module(reward=None, lora=LORA, quantization="none", batch=8, **kwargs):
    kwargs.setdefault("ppo", PPOConfig(mini_batch_size=4, ppo_epochs=2))
    kwargs.setdefault("sampling", SamplingConfig(min_new_tokens=3, max_new_tokens=8))
    kwargs.setdefault("optim", OptimConfig(lr=1e-3, min_lr_ratio=1.0))
    lm = ModelConfig(arch=TINY_LLAMA, tokenizer="demo", lora=lora, quantization=quantization)
    return PPOModule(lm, reward or LetterReward(), rollout_batch_size=batch, **kwargs)


def make_data(module, batch=8, path="demo", **kwargs):
    return PromptDataModule(path, batch_size=batch, val_size=16, tokenizer=module.tokenizer, **kwargs)


def make_batch(module, n=8):
    dm = make_data(module, batch=n)
    dm.setup("fit")
    return dm.train_dataloader().dataset.batch(0)


def ready(module):
    module.configure_model()
    return module
