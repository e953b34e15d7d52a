"""DPOModule: direct preference optimisation of a causal LM on packed pair batches."""

from __future__ import annotations

import copy
from typing import Literal

import torch
from torch import nn
from torchmetrics import MeanMetric

from lit_rlhf.models import ModelConfig
from lit_rlhf.models.attention import packed_attention_mask, packing_problem
from lit_rlhf.modules.base import HFModule
from lit_rlhf.objectives.logprobs import logprobs_from_logits, packed_sequence_logprobs
from lit_rlhf.objectives.preference import DPOLossType, dpo_loss
from lit_rlhf.optim import OptimConfig

_METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracy", "rewards/margin",
            "logps/chosen", "logps/rejected")


class DPOModule(HFModule):
    """DPO (Rafailov et al. 2023) and its family on :class:`~lit_rlhf.data.PreferenceDataModule`
    pairs, packed: ``{"input_ids", "position_ids": (1, N), "lengths", "prompt_lengths": (2B,)}``,
    chosen sequences first.

    One forward per model over the packed row, attention kept inside each sequence, gives
    the summed log-probs of each side's response tokens (the tokens after the pair's shared
    prefix, see :class:`~lit_rlhf.data.preference.Pair`). The reference is the same base with
    the adapters switched off (LoRA: no second model, also for an 8-/4-bit base), or a frozen
    copy of the starting model (full fine-tuning), or none (``reference: none``). Logs
    ``{train,val}/loss`` and ``rewards/{chosen,rejected,accuracy,margin}`` (beta-scaled
    log-ratios, ties wrong), ``logps/{chosen,rejected}``; the adapter (or model) is saved at
    the end of fit like SFT's.
    """

    # Policy and reference passes are compared: the base model's dropout is off (the adapters'
    # own dropout only acts when they are on, i.e. in the policy pass).
    dropout = False

    def __init__(
        self,
        lm: ModelConfig,
        optim: OptimConfig | None = None,
        beta: float = 0.1,
        loss_type: DPOLossType = "sigmoid",
        label_smoothing: float = 0.0,
        nll_coef: float = 0.0,
        reference: Literal["model", "none"] = "model",
    ) -> None:
        """
        Args:
            lm: the policy, usually the SFT model; its starting weights are the reference.
            optim: optimizer and schedule.
            beta: inverse temperature of the implicit reward ``beta * (logp - ref)``, > 0.
            loss_type: ``sigmoid`` (DPO), ``ipo`` or ``hinge`` (see
                :func:`~lit_rlhf.objectives.preference.dpo_loss`).
            label_smoothing: conservative DPO's probability that a label is flipped (sigmoid).
            nll_coef: weight of the chosen responses' mean token NLL (RPO); 0: off.
            reference: ``model`` (adapters off, or a frozen copy) or ``none`` (reference-free).
        """
        super().__init__(lm, optim)
        # The settings are checked now, by the loss itself, before any weights load.
        zero = torch.zeros(1)
        dpo_loss(zero, zero, zero, zero, beta=beta, loss_type=loss_type, label_smoothing=label_smoothing,
                 nll_chosen=zero, nll_coef=nll_coef)
        if (problem := packing_problem(self.architecture, None)) is not None:
            raise ValueError(f"model {lm.name_or_path or lm.arch}: packed pairs cannot be kept apart: {problem}")
        self.save_hyperparameters()
        self.ref_model: nn.Module | None = None
        # Checkpoints never hold the frozen reference copy; HFModule.on_load_checkpoint checks
        # that they hold exactly the keys they should, so loading need not be strict.
        self.strict_loading = False
        self.val_metrics = nn.ModuleDict({name.replace("/", "_"): MeanMetric() for name in _METRICS})

    def configure_model(self) -> None:
        if self.model is not None:
            return
        super().configure_model()
        if self.lm_config.lora is None and self.hparams.reference == "model":
            self.ref_model = copy.deepcopy(self.model).requires_grad_(False).eval()

    def checkpoint_keys(self) -> set[str]:
        # Never the frozen reference copy: it is the starting model, rebuilt at load.
        return {k for k in super().checkpoint_keys() if not k.startswith("ref_model.")}

    def sequence_logps(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(2B,) summed response log-probs and (2B,) response token counts under ``model``."""
        ids, positions = batch["input_ids"], batch["position_ids"]
        mask = packed_attention_mask(positions, model.config._attn_implementation, self.lm_config.torch_dtype)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).logits
        token = logprobs_from_logits(logits[:, :-1], ids[:, 1:])[0]  # token t predicted from t - 1
        token = torch.cat([token.new_zeros(1), token])
        return packed_sequence_logprobs(token, positions[0], batch["lengths"], batch["prompt_lengths"])

    @torch.no_grad()
    def reference_logps(self, batch: dict) -> torch.Tensor | None:
        if self.hparams.reference == "none":
            return None
        if self.ref_model is not None:
            return self.sequence_logps(self.ref_model, batch)[0]
        # LoRA: the same base with the adapters switched off is the starting model, exactly.
        with self.model.disable_adapter():
            return self.sequence_logps(self.model, batch)[0]

    def _step(self, batch: dict) -> dict[str, torch.Tensor]:
        if "lengths" not in batch:
            raise ValueError("DPOModule needs packed pair batches (data.init_args.pack: true)")
        # 1. policy and reference log-probs of both sides, one forward each
        logps, counts = self.sequence_logps(self.model, batch)
        ref = self.reference_logps(batch)
        lc, lr = logps.chunk(2)
        rc, rr = ref.chunk(2) if ref is not None else (None, None)
        # 2. the loss on the log-ratio margin (plus RPO's NLL on the chosen side)
        h = self.hparams
        stats = dpo_loss(lc, lr, rc, rr, beta=h.beta, loss_type=h.loss_type, label_smoothing=h.label_smoothing,
                         nll_chosen=-lc / counts.chunk(2)[0].clamp(min=1), nll_coef=h.nll_coef)
        return {"loss": stats.loss, "rewards/chosen": stats.reward_chosen.mean(),
                "rewards/rejected": stats.reward_rejected.mean(), "rewards/accuracy": stats.accuracy,
                "rewards/margin": (stats.reward_chosen - stats.reward_rejected).mean(),
                "logps/chosen": lc.detach().mean(), "logps/rejected": lr.detach().mean()}

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        out = self._step(batch)
        self.check_finite("train/loss", out["loss"])
        self.log("train/loss", out["loss"].detach(), prog_bar=True)
        self.log_dict({f"train/{k}": v.detach() for k, v in out.items() if k != "loss"})
        return out["loss"]

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        n = batch["lengths"].numel() // 2
        for name, value in self._step(batch).items():  # pair-weighted, reduced across ranks
            self.val_metrics[name.replace("/", "_")].update(value.detach(), weight=n)

    def on_validation_epoch_end(self) -> None:
        self.log_dict({f"val/{name}": self.val_metrics[name.replace("/", "_")].compute() for name in _METRICS},
                      prog_bar=True)
        for metric in self.val_metrics.values():
            metric.reset()
