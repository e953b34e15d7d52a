"""DPOModule: direct preference optimisation of a causal LM on packed pair batches."""

from __future__ import annotations

import copy
import time
from typing import Literal

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torch.nn.utils.rnn import pad_sequence
from torchmetrics import MeanMetric

from lit_rlhf.data.preference import PairDataset, pack_pairs
from lit_rlhf.models import ModelConfig, unwrap_peft
from lit_rlhf.models.attention import (
    SEGMENT_SDPA,
    flash_varlen_kwargs,
    keeps_packed_sequences_apart,
    packing_problem,
    use_segment_attention,
)
from lit_rlhf.modules.base import HFModule, gather_ranks
from lit_rlhf.objectives.logprobs import (
    logprobs_from_logits,
    packed_sequence_logprobs,
    response_token_mask,
)
from lit_rlhf.objectives.preference import DPOLossType, dpo_loss
from lit_rlhf.optim import OptimConfig

_METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracy", "rewards/margin",
            "logps/chosen", "logps/rejected")


class DPOModule(HFModule):
    """DPO (Rafailov et al. 2023) and its family on :class:`~lit_rlhf.data.PreferenceDataModule`
    pairs, packed: ``{"input_ids", "position_ids": (1, N), "lengths", "prompt_lengths": (2B,)}``,
    chosen sequences first.

    One forward per model over the packed row, attention kept inside each sequence (padded
    rows for eager or sliding-window models, as the reward model does), gives the summed
    log-probs of each side's response tokens (the tokens after the pair's shared prefix, see
    :class:`~lit_rlhf.data.preference.Pair`). The reference is the same base with
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
        precompute_reference: bool = False,
        length_normalize: bool = False,
        target_margin: float = 0.0,
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
            precompute_reference: compute the reference log-probs of every train and val pair
                once, before the first step, and keep them with the pairs: no reference pass
                per step, and a full fine-tuning run frees its frozen copy afterwards.
            length_normalize: score each response by its mean token log-prob instead of the
                sum (SimPO; with ``reference: none`` and a ``target_margin`` it is SimPO's loss).
            target_margin: SimPO's gamma, a margin the scaled log-ratio must exceed (sigmoid).
        """
        super().__init__(lm, optim)
        # The settings are checked now, by the loss itself, before any weights load.
        zero = torch.zeros(1)
        dpo_loss(zero, zero, zero, zero, beta=beta, loss_type=loss_type, label_smoothing=label_smoothing,
                 nll_chosen=zero, nll_coef=nll_coef, target_margin=target_margin)
        if precompute_reference and reference == "none":
            raise ValueError("model.init_args.precompute_reference: true needs a reference model, but reference is 'none'")
        if (problem := packing_problem(self.architecture, None)) is not None:
            raise ValueError(f"model {lm.name_or_path or lm.arch}: packed pairs cannot be kept apart: {problem}")
        self.save_hyperparameters()
        self.ref_model: nn.Module | None = None
        # Checkpoints never hold the frozen reference copy; HFModule.on_load_checkpoint checks
        # that they hold exactly the keys they should, so loading need not be strict.
        self.strict_loading = False
        self.val_metrics = nn.ModuleDict({name.replace("/", "_"): MeanMetric() for name in _METRICS})

    def prepare_model(self) -> None:
        # Plain SDPA on every call, except packed batches: one attention per sequence.
        use_segment_attention(unwrap_peft(self.model))
        if self.lm_config.lora is None and self.hparams.reference == "model":
            self.ref_model = copy.deepcopy(self.model).requires_grad_(False).eval()

    def fsdp_roots(self) -> list[nn.Module | None]:
        return [self.model, self.ref_model]

    def checkpoint_keys(self) -> set[str]:
        # Never the frozen reference copy: it is the starting model, rebuilt at load.
        return {k for k in super().checkpoint_keys() if not k.startswith("ref_model.")}

    def sequence_logps(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(2B,) summed response log-probs and (2B,) response token counts under ``model``.

        One forward over the packed row ``(1, N)``. Attention stays inside each sequence: one
        causal SDPA per sequence (segment attention, switched on at load) or flash attention's
        variable-length kernel. Any other model (eager attention, sliding windows) gets the
        sequences back as right-padded rows, as the reward model does
        (:func:`~lit_rlhf.models.attention.keeps_packed_sequences_apart`): the same values. The LM
        head runs only where a response token is predicted (``logits_to_keep``, which also
        applies a model's own logit scaling or soft-capping).
        """
        ids, positions, lengths = batch["input_ids"], batch["position_ids"], batch["lengths"]
        implementation = unwrap_peft(model).config._attn_implementation
        if not keeps_packed_sequences_apart(implementation):
            return self._padded_sequence_logps(model, batch)
        if implementation == SEGMENT_SDPA:  # the all-ones mask: transformers builds no mask
            extra = {"attention_mask": torch.ones_like(ids), "segment_lengths": lengths.tolist()}
        else:  # flash attention: the sequences' boundaries, explicitly
            extra = flash_varlen_kwargs(positions)
        scored = response_token_mask(positions[0], lengths, batch["prompt_lengths"]).nonzero()[:, 0]  # (M,)
        # token t is predicted from position t - 1 (t >= 1: a sequence's first token is never scored)
        logits = model(input_ids=ids, position_ids=positions, use_cache=False, logits_to_keep=scored - 1,
                       **extra).logits
        token = ids.new_zeros(ids.size(1), dtype=torch.float32).index_put(
            (scored,), logprobs_from_logits(logits, ids[:, scored])[0])
        return packed_sequence_logprobs(token, positions[0], lengths, batch["prompt_lengths"])

    def _padded_sequence_logps(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`sequence_logps` for a model that cannot keep packed sequences apart by itself:
        the 2B sequences as right-padded rows ``(2B, T)``, with the model's own masks (its
        sliding window included). The LM head runs at the columns where some row predicts a
        response token."""
        ids, positions, lengths = batch["input_ids"], batch["position_ids"], batch["lengths"]
        sequences = ids[0].split(lengths.tolist())
        rows = pad_sequence(sequences, batch_first=True, padding_value=self.tokenizer.pad_token_id or 0)  # (2B, T)
        mask = pad_sequence([torch.ones_like(s) for s in sequences], batch_first=True)
        scored = response_token_mask(positions[0], lengths, batch["prompt_lengths"]).nonzero()[:, 0]  # (M,)
        # packed token t is row `row[t]`, column `column[t]` of the padded rows
        row = torch.repeat_interleave(torch.arange(len(lengths), device=ids.device), lengths)[scored]
        column = (scored - torch.repeat_interleave(lengths.cumsum(0) - lengths, lengths)[scored])
        keep = (column - 1).unique()  # (K,) sorted: token t is predicted from column t - 1
        logits = model(input_ids=rows, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                       use_cache=False, logits_to_keep=keep).logits  # (2B, K, V)
        picked = logits[row, torch.searchsorted(keep, column - 1)]  # (M, V)
        token = ids.new_zeros(ids.size(1), dtype=torch.float32).index_put(
            (scored,), logprobs_from_logits(picked[None], ids[:, scored])[0])
        return packed_sequence_logprobs(token, positions[0], lengths, batch["prompt_lengths"])

    @torch.no_grad()
    def reference_logps(self, batch: dict) -> torch.Tensor | None:
        """(2B,) summed response log-probs under the reference; None without one."""
        if self.hparams.reference == "none":
            return None
        if "reference_logps" in batch:  # precomputed
            return batch["reference_logps"]
        if self.hparams.precompute_reference:
            raise RuntimeError("precompute_reference: a batch came without reference log-probs "
                               "(are its pairs from the datamodule's train_set/val_set?)")
        return self._reference_pass(batch)

    def _reference_pass(self, batch: dict) -> torch.Tensor:
        if self.ref_model is not None:
            return self.sequence_logps(self.ref_model, batch)[0]
        # LoRA: the same base with the adapters switched off is the starting model, exactly.
        with self.model.disable_adapter():
            return self.sequence_logps(self.model, batch)[0]

    def setup(self, stage: str) -> None:
        # Before any weights load, and before the run starts (a mistake found in the first step
        # would be the run's, with a traceback): the datamodule must pack its pairs.
        super().setup(stage)
        hparams = getattr(getattr(self.trainer, "datamodule", None), "hparams", None)
        if hparams is not None and hparams.get("pack", True) is False:
            raise ValueError("DPOModule needs packed pair batches (data.init_args.pack: true)")

    def on_fit_start(self) -> None:
        super().on_fit_start()
        if self.hparams.precompute_reference:
            self.precompute_reference_logps()

    @torch.no_grad()
    def precompute_reference_logps(self) -> None:
        """Reference log-probs of every pair of the datamodule's ``train_set`` and ``val_set``,
        kept on the pairs (batches then carry ``reference_logps``). Each rank computes every
        ``world``-th batch; the results are gathered so that every rank holds all of them."""
        datamodule = self.trainer.datamodule
        sets = [getattr(datamodule, name, None) for name in ("train_set", "val_set")]
        if not isinstance(sets[0], PairDataset):
            raise ValueError("precompute_reference needs a PreferenceDataModule (its train_set of pairs)")
        start, rank, world = time.perf_counter(), self.global_rank, self.trainer.world_size
        batch_size = datamodule.hparams.batch_size
        for dataset in (d for d in sets if isinstance(d, PairDataset) and not d.has_reference()):
            # Similar lengths together, as in training; rank r takes batches r, r + world, ...
            lengths = dataset.lengths()
            order = sorted(range(len(dataset)), key=lengths.__getitem__)
            every = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
            batches = every[rank::world]
            # Every rank runs as many passes (a sharded reference gathers its weights in each):
            # a rank with one batch fewer repeats its last one and drops the result.
            passes = -(-len(every) // world)
            mine = []
            for k in range(passes):
                indices = batches[min(k, len(batches) - 1)] if batches else every[0]
                batch = self.transfer_batch_to_device(pack_pairs(dataset[indices], 0), self.device, 0)
                with self.trainer.precision_plugin.forward_context():
                    logps = self._reference_pass(batch).float().cpu()
                if k < len(batches):
                    mine += [(i, c, r) for i, (c, r) in zip(indices, logps.view(2, -1).t().tolist())]
            gathered = [item for part in gather_ranks(mine) for item in part]
            logps = torch.zeros(len(dataset), 2, dtype=torch.float64)
            logps[[i for i, _, _ in gathered]] = torch.tensor([[c, r] for _, c, r in gathered], dtype=torch.float64)
            dataset.set_reference(logps)
        if self.ref_model is not None:  # the frozen copy has done its work
            self.ref_model = None
        rank_zero_info(f"DPO: reference log-probs of {sum(len(d) for d in sets if d is not None)} pairs "
                       f"precomputed in {time.perf_counter() - start:.1f} s")

    def _step(self, batch: dict) -> dict[str, torch.Tensor]:
        if "lengths" not in batch:
            raise ValueError("DPOModule needs packed pair batches (data.init_args.pack: true)")
        # 1. policy and reference log-probs of both sides, one forward each
        logps, counts = self.sequence_logps(self.model, batch)
        ref = self.reference_logps(batch)
        counts = counts.clamp(min=1)
        nll_chosen = -(logps / counts).chunk(2)[0]  # RPO's mean token NLL of the chosen side
        h = self.hparams
        if h.length_normalize:  # SimPO: mean token log-probs, for the reference too
            logps = logps / counts
            ref = ref / counts if ref is not None else None
        lc, lr = logps.chunk(2)
        rc, rr = ref.chunk(2) if ref is not None else (None, None)
        # 2. the loss on the log-ratio margin (plus RPO's NLL on the chosen side)
        stats = dpo_loss(lc, lr, rc, rr, beta=h.beta, loss_type=h.loss_type, label_smoothing=h.label_smoothing,
                         nll_chosen=nll_chosen, nll_coef=h.nll_coef, target_margin=h.target_margin)
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
