"""RewardModule: a scalar reward model trained on preference pairs."""

from __future__ import annotations

from pathlib import Path

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from lit_rlhf.export import merge_adapter
from lit_rlhf.metrics import PairMetrics
from lit_rlhf.models import ModelConfig, save_pretrained_atomic, unwrap_peft
from lit_rlhf.models.attention import (
    SEGMENT_SDPA,
    flash_varlen_kwargs,
    keeps_packed_sequences_apart,
    use_segment_attention,
)
from lit_rlhf.models.heads import last_block_rows
from lit_rlhf.modules.base import HFModule
from lit_rlhf.objectives.preference import pairwise_loss
from lit_rlhf.optim import OptimConfig


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) 0/1 mask -> (B, T) positions counting real tokens only.

    Left-padded rows then get the same positions as unpadded ones; padded slots get 0.
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class RewardModule(HFModule):
    """Reward model: a one-output sequence classifier scored at the last non-pad token.

    Batches from :class:`~lit_rlhf.data.PreferenceDataModule` hold B pairs, scored in one
    forward pass: packed, ``{"input_ids", "position_ids": (1, N), "lengths": (2B,),
    "margin": (B,)}``, or padded, ``{"input_ids", "attention_mask": (2B, T), "margin"}``;
    chosen sequences first, rejected after, in both. Logs loss, accuracy, margin and reward mean/std for train and
    val; at the end of fit exports a merged HF model to ``<log dir>/export`` and, with LoRA, keeps
    the adapter with its score head in ``<log dir>/adapter`` (for
    :class:`~lit_rlhf.rewards.AdapterReward`).
    """

    task = "seq_cls"

    def __init__(self, lm: ModelConfig, optim: OptimConfig | None = None, center_coef: float = 0.0,
                 new_score_head: bool = True) -> None:
        """
        Args:
            lm: the model; with LoRA the score head is trained and saved with the adapter.
            optim: optimizer and schedule.
            center_coef: reward centering weight ``c`` in ``c * mean((r_c + r_r)^2)`` (0: off).
            new_score_head: ``lm`` may be a causal LM without a score head, which is then
                created with the architecture's random init; False: ``lm`` must be a
                reward model with its head (continuing its training). Every other weight must
                be in the checkpoint either way.
        """
        super().__init__(lm, optim)
        self.new_head = new_score_head
        if center_coef < 0:
            raise ValueError(f"model.init_args.center_coef must be >= 0, got {center_coef}")
        self.save_hyperparameters()
        self.center_coef = center_coef
        self.train_metrics = PairMetrics()
        self.val_metrics = PairMetrics()
        self.last_val: dict[str, float] = {}

    def prepare_model(self) -> None:
        # Plain SDPA on every call, except packed batches: one attention per sequence.
        use_segment_attention(self._transformers_model)

    def fsdp_roots(self) -> list[nn.Module | None]:
        # The packed pass calls the trunk and the score head itself (forward_packed): each is a root.
        model = self._transformers_model
        head = getattr(model, "score", None)
        return [model.base_model, head] if head is not None else [self.model]

    @property
    def _transformers_model(self):
        """The transformers model, under the peft wrapper when there is one."""
        return unwrap_peft(self.model)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(N, T) ids and mask -> (N,) scores, read at each row's last non-pad token."""
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids_from_mask(attention_mask),
            use_cache=False,
        )
        return out.logits.squeeze(-1).float()

    def forward_packed(self, input_ids: torch.Tensor, position_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Scores of sequences laid end to end in one row (see :func:`~lit_rlhf.data.pack_pairs`).

        Attention stays inside each sequence: with segment attention (``sdpa`` models
        without local attention, switched at load) one causal SDPA per sequence; with flash
        attention its variable-length kernel, given the sequences' boundaries. Any other model (eager attention, sliding windows, a model
        that transformers cannot switch, a head not called ``score``) gets the sequences back
        as right-padded rows: the same scores, with padding. On the CPU the packed pass runs the last
        block's MLP at the scored tokens only (:func:`~lit_rlhf.models.heads.last_block_rows`, a
        CPU path).

        Args:
            input_ids, position_ids: (1, N); positions restart at 0 where a sequence starts.
            lengths: (S,) sequence lengths, summing to N.

        Returns:
            (S,) float32 scores at each sequence's last token.
        """
        model = self._transformers_model
        implementation = model.config._attn_implementation
        head = getattr(model, "score", None)
        if head is None or not keeps_packed_sequences_apart(implementation):
            sequences = input_ids[0].split(lengths.tolist())
            padded = pad_sequence(sequences, batch_first=True, padding_value=self.tokenizer.pad_token_id or 0)
            mask = pad_sequence([torch.ones_like(s) for s in sequences], batch_first=True)
            return self(padded, mask)
        if implementation == SEGMENT_SDPA:
            # The all-ones mask tells transformers there is no padding, so it builds no mask.
            extra = {"attention_mask": torch.ones_like(input_ids), "segment_lengths": lengths.tolist()}
        else:  # flash attention: the sequences' boundaries, explicitly
            extra = flash_varlen_kwargs(position_ids)
        last_index = lengths.cumsum(0) - 1
        with last_block_rows(model.base_model, last_index):  # the last block's MLP at the scored tokens only
            hidden = model.base_model(input_ids=input_ids, position_ids=position_ids, use_cache=False, **extra)
        return head(hidden.last_hidden_state[0, last_index]).squeeze(-1).float()

    def _pair_step(self, batch: dict):
        if "lengths" in batch:
            scores = self.forward_packed(batch["input_ids"], batch["position_ids"], batch["lengths"])
        else:
            scores = self(batch["input_ids"], batch["attention_mask"])
        r_chosen, r_rejected = scores.chunk(2)
        margin = batch.get("margin")
        stats = pairwise_loss(r_chosen, r_rejected, margin, self.center_coef)
        return stats, r_chosen, r_rejected

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        stats, r_chosen, r_rejected = self._pair_step(batch)
        self.check_finite("train/loss", stats.loss)
        self.log("train/loss", stats.loss, prog_bar=True)
        # Train metrics over the last log_every_n_steps batches, reduced across ranks.
        self.train_metrics.update(r_chosen, r_rejected)
        if (self.global_step + 1) % self.trainer.log_every_n_steps == 0:
            self._log_metrics("train", self.train_metrics)
        return stats.loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        stats, r_chosen, r_rejected = self._pair_step(batch)
        self.val_metrics.update(r_chosen, r_rejected)
        self.log("val/loss", stats.loss, sync_dist=True, batch_size=r_chosen.numel())

    def on_validation_epoch_end(self) -> None:
        self.last_val = self._log_metrics("val", self.val_metrics)

    def _log_metrics(self, split: str, metric: PairMetrics) -> dict[str, float]:
        values = metric.compute()
        metric.reset()
        self.log_dict({f"{split}/{k}": v for k, v in values.items()}, prog_bar=split == "val")
        return {k: float(v) for k, v in values.items()}

    @property
    def merged_dir(self) -> Path:
        return self.export_dir.parent / "export"

    def export_meta(self) -> dict:
        # Reward statistics over the validation set travel with the model (merged export and
        # adapter alike), for PPO's reward normalization.
        return {**super().export_meta(), "reward_mean": self.last_val.get("reward_mean"),
                "reward_std": self.last_val.get("reward_std"), "val_accuracy": self.last_val.get("accuracy")}

    def on_train_end(self) -> None:
        if self.lm_config.lora is not None:
            # The adapter (LoRA + score head): AdapterReward serves it from a policy's base,
            # and the merge below reads it.
            super().on_train_end()
        adapter_dir, merged_dir = self.export_dir, self.merged_dir  # collectives: on every rank
        state = self.export_state_dict(self.model) if self.lm_config.lora is None else None
        if not self.trainer.is_global_zero:
            return
        meta = {k: v for k, v in self.export_meta().items() if k != "base"}  # a merged model has no base
        if self.lm_config.lora is None:
            path = save_pretrained_atomic(self.model, merged_dir, self.tokenizer, state_dict=state, **meta)
        else:
            path = merge_adapter(self.lm_config, adapter_dir, merged_dir, tokenizer=self.tokenizer,
                                 task=self.task, dtype=self.lm_config.dtype, **meta)
        rank_zero_info(f"exported reward model to {path}")
