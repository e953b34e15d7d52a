"""SFTModule: causal-LM fine-tuning on packed chunks."""

from __future__ import annotations

import torch
from torchmetrics import MeanMetric

from lit_rlhf.models import ModelConfig, max_positions
from lit_rlhf.models.attention import packed_attention_kwargs, packing_problem
from lit_rlhf.modules.base import HFModule
from lit_rlhf.objectives.lm import causal_lm_loss
from lit_rlhf.optim import OptimConfig


class SFTModule(HFModule):
    """Supervised fine-tuning of a causal LM (full or LoRA, optionally quantized).

    Batches are ``{"input_ids", "labels", "position_ids"}`` of shape (B, T) from
    :class:`~lit_rlhf.data.SFTDataModule`. Logs ``train/loss``, ``val/loss``, ``val/ppl``
    and ``val/token_acc``; the adapter (or full model) is saved at the end of fit.
    """

    def __init__(
        self, lm: ModelConfig, optim: OptimConfig | None = None, seq_length: int | None = None
    ) -> None:
        """
        Args:
            lm: the model to fine-tune.
            optim: optimizer and schedule.
            seq_length: chunk length of the data; checked against the model's positions
                before any weights load (the CLI links it from ``data.seq_length``).
        """
        super().__init__(lm, optim)
        self.save_hyperparameters()
        architecture = self.architecture
        name = lm.name_or_path or lm.arch
        if seq_length is not None:
            limit = max_positions(architecture)
            if limit is not None and seq_length > limit:
                raise ValueError(f"data.seq_length={seq_length} exceeds the model's {limit} positions ({name})")
        if (problem := packing_problem(architecture, seq_length)) is not None:
            raise ValueError(f"model {name}: packed SFT cannot keep documents apart: {problem}")
        self.val_loss = MeanMetric()
        self.val_acc = MeanMetric()

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) ids -> (B, T, V) logits; documents inside a chunk attend only to themselves.

        ``position_ids`` (B, T) restart at every document. The block-diagonal mask built from
        them is passed explicitly: transformers' own detection of packed sequences from
        position ids works only where a model's code hands them to its mask builder, and (under
        flash attention) only for one row: flash attention gets the documents' boundaries.
        """
        packed = {}
        if position_ids is not None:
            packed = packed_attention_kwargs(position_ids, self.model.config._attn_implementation,
                                             self.lm_config.torch_dtype)
        return self.model(input_ids=input_ids, position_ids=position_ids, use_cache=False, **packed).logits

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        stats = causal_lm_loss(self(batch["input_ids"], batch["position_ids"]), batch["labels"])
        self.check_finite("train/loss", stats.loss)
        self.log("train/loss", stats.loss, prog_bar=True)
        return self._global_token_mean(stats.loss, stats.n_tokens)

    def _global_token_mean(self, loss: torch.Tensor, n_tokens: torch.Tensor) -> torch.Tensor:
        """This rank's token-mean ``loss``, reweighted so that the gradient the ranks average
        (DDP, FSDP2) is that of the token mean over the whole global batch, as on one device.

        Ranks count different numbers of trained tokens (prompt tokens and a document's first
        token in a chunk are not trained): a plain mean of per-rank means would weight a
        rank's tokens more where it has fewer. One all-reduce of a scalar per step.
        """
        if self.trainer.world_size == 1:
            return loss
        mean_tokens = self.trainer.strategy.reduce(n_tokens.float(), reduce_op="mean")
        return loss * n_tokens / mean_tokens.clamp(min=1)

    def on_train_epoch_start(self) -> None:
        # Iterable datasets get no sampler.set_epoch from Lightning: reshuffle here.
        dataset = getattr(self.trainer.train_dataloader, "dataset", None)
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(self.current_epoch)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        logits = self(batch["input_ids"], batch["position_ids"])
        stats = causal_lm_loss(logits, batch["labels"], count_correct=True)
        n = stats.n_tokens.clamp(min=1).float()
        # Token-weighted means, reduced across ranks by torchmetrics.
        self.val_loss.update(stats.loss.detach(), weight=n)
        self.val_acc.update(stats.n_correct.float() / n, weight=n)

    def on_validation_epoch_end(self) -> None:
        loss = self.val_loss.compute()
        self.log_dict(
            {"val/loss": loss, "val/ppl": loss.exp(), "val/token_acc": self.val_acc.compute()},
            prog_bar=True,
        )
        self.val_loss.reset()
        self.val_acc.reset()
