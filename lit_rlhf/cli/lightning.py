"""The LightningCLI that every ``fit`` runs, and a check of a command line without training
(used by the pipeline before its first stage).

The entry point that dispatches to it is :mod:`lit_rlhf.cli`; the one line a user's mistake
becomes is :mod:`lit_rlhf.cli.errors`.
"""

from __future__ import annotations

import dataclasses
import sys

import lightning as L
import torch
from lightning.pytorch.cli import LightningCLI

from lit_rlhf.cli.config_files import default_precision, expand_config_includes, strategy_problem


def machine_has_bf16_gpu() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


class LitRLHFCLI(LightningCLI):
    """LightningCLI with the data <-> model links every stage needs."""

    # data init arg -> module init arg, copied before instantiation so the module can check
    # them at construction, before any weights load.
    DATA_TO_MODEL = {"seq_length": "seq_length", "batch_size": "rollout_batch_size"}

    def before_instantiate_classes(self) -> None:
        config = self.config.get(self.subcommand, self.config) if self.subcommand else self.config
        model_args, data_args = config.model.init_args, config.data.init_args
        accelerator = config.get("trainer", {}).get("accelerator")
        if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
            raise ValueError(f"trainer.accelerator={accelerator!r}: no CUDA GPU is visible on this machine "
                             "(use trainer.accelerator=cpu or auto, or check CUDA_VISIBLE_DEVICES)")
        if (problem := strategy_problem(config.trainer.get("strategy"))) is not None:
            raise ValueError(problem)
        if config.trainer.get("precision") is None:
            # Decided after the accelerator: `accelerator: cpu` on a GPU machine stays 32-true.
            config.trainer.precision = default_precision(accelerator, machine_has_bf16_gpu())
        for source, target in self.DATA_TO_MODEL.items():
            if target in model_args and source in data_args and model_args[target] is None:
                model_args[target] = data_args[source]

    def _parse_ckpt_path(self) -> None:
        # Lightning would apply the checkpoint's hyper-parameters over the config, class path
        # included: an RM checkpoint turned an SFT command into a RewardModule run. Here the
        # configured run is what runs, and the checkpoint must be one of its own.
        if not self.config.get("subcommand"):
            return
        config = self.config[self.config.subcommand]
        path = config.get("ckpt_path")
        path = None if path is None else str(path)
        if path is None or path in ("last", "best", "hpc", "registry") or path.startswith("registry:"):
            return  # Lightning's own names, resolved by the Trainer
        from lit_rlhf.modules.base import check_checkpoint

        model = config.model
        lm = model.init_args.get("lm") if model.get("init_args") is not None else None
        lm = lm.as_dict() if hasattr(lm, "as_dict") else lm
        if lm is not None and not isinstance(lm, dict):
            lm = dataclasses.asdict(lm) if dataclasses.is_dataclass(lm) else None
        check_checkpoint(path, model.class_path, lm)

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        # The datamodule tokenizes with the model's tokenizer (one source of truth).
        if getattr(self.datamodule, "tokenizer", "absent") is None:
            self.datamodule.tokenizer = self.model.tokenizer


def cli_kwargs(args: list[str] | None, **overrides) -> dict:
    return dict(
        model_class=L.LightningModule,
        datamodule_class=L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        # Re-running into the same log dir must not crash on an existing config.yaml.
        save_config_kwargs={"overwrite": True},
        # Parser errors are raised, not printed with the usage: main reports their cause.
        parser_kwargs={"exit_on_error": False,
                       **{name: {"exit_on_error": False} for name in ("fit", "validate", "test", "predict")}},
        args=args,
        **overrides,
    )


def check_fit_config(args: list[str]) -> None:
    """Parse a ``fit`` command line (without ``fit``) and build its module, datamodule and
    trainer (tokenizer and model config only, no weights), without training. Raises what
    :func:`lit_rlhf.cli.main` reports. The pipeline checks every stage with it before the
    first one trains."""
    argv, sys.argv[1:] = sys.argv[1:], []  # LightningCLI warns when given `args` beside sys.argv
    try:
        LitRLHFCLI(**cli_kwargs(expand_config_includes(list(args)), run=False, save_config_callback=None))
    finally:
        sys.argv[1:] = argv
