"""What every stage's LightningModule shares: loading, trainable-only checkpoints, export."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import lightning as L
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from lit_rlhf.models import (
    ModelConfig,
    attention_for,
    load_model,
    load_tokenizer,
    save_pretrained_atomic,
    trainable_parameters,
)
from lit_rlhf.optim import OptimConfig, build_optimizer


def as_config(cls, value):
    """``value`` as dataclass ``cls``: checkpoints store configs as plain dicts."""
    return cls(**value) if isinstance(value, dict) else value


class HFModule(L.LightningModule):
    """A LightningModule around one transformers model built from a :class:`ModelConfig`.

    The tokenizer loads at construction (cheap, and the datamodule needs it); the weights
    load in :meth:`configure_model`, once the Trainer knows each rank's device, because
    quantized weights cannot be moved after loading.
    """

    task = "causal_lm"

    def __init__(self, lm: ModelConfig, optim: OptimConfig | None = None) -> None:
        super().__init__()
        self.lm_config = as_config(ModelConfig, lm)
        self.optim_config = as_config(OptimConfig, optim) or OptimConfig()
        lm = self.lm_config
        self.tokenizer = load_tokenizer(lm.tokenizer, trust_remote_code=lm.trust_remote_code)
        # The model's config.json only (no weights): checks against it fail here, not at load.
        self.architecture = lm.architecture(self.tokenizer)
        attention_for(lm, self.architecture, self.task)  # an implementation the class refuses
        self.model = None
        # With adapters, checkpoints hold only trainable weights (see on_save_checkpoint).
        self.strict_loading = lm.lora is None

    def configure_model(self) -> None:
        if self.model is not None:
            return
        device = self.trainer.strategy.root_device if self._trainer is not None else None
        self.model = load_model(self.lm_config, self.tokenizer, task=self.task, device=device)
        trainable, total = trainable_parameters(self.model)
        rank_zero_info(f"{type(self).__name__}: {trainable:,} trainable of {total:,} parameters, "
                       f"attention {self.model.config._attn_implementation}")

    def configure_optimizers(self):
        return build_optimizer(
            self.parameters(), self.optim_config, int(self.trainer.estimated_stepping_batches),
            allow_fused=self._allow_fused_optimizer(),
        )

    def _allow_fused_optimizer(self) -> bool:
        # Lightning's mixed-precision plugin raises when asked to clip the gradients of a
        # fused optimizer (it may unscale them itself), so clipping there means unfused.
        mixed = isinstance(self.trainer.precision_plugin, MixedPrecision)
        return not (mixed and self.trainer.gradient_clip_val)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Plain types only, so the checkpoint loads with torch.load(weights_only=True).
        checkpoint["hyper_parameters"] = {
            k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v
            for k, v in checkpoint.get("hyper_parameters", {}).items()
        }
        # A LoRA checkpoint of a 20B base should be megabytes, not the frozen 20B weights.
        if self.lm_config.lora is not None:
            keep = {name for name, p in self.named_parameters() if p.requires_grad}
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}

    @property
    def hf_model(self) -> nn.Module:
        """The transformers (or peft) model that is saved at the end of fit."""
        return self.model

    @property
    def export_dir(self) -> Path:
        """``<log dir>/adapter`` for LoRA runs, ``<log dir>/model`` for full fine-tuning."""
        root = Path(self.trainer.log_dir or self.trainer.default_root_dir)
        return root / ("adapter" if self.lm_config.lora is not None else "model")

    def on_train_end(self) -> None:
        path = self.export_dir  # trainer.log_dir is a collective under DDP: every rank asks
        if self.trainer.is_global_zero:
            # peft writes the adapter in its standard format (PeftModel.from_pretrained loads it).
            save_pretrained_atomic(self.hf_model, path, self.tokenizer)
            rank_zero_info(f"saved {path}")
