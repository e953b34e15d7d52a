"""The command line: one LightningCLI for every stage, chosen by the config's class paths.

    python train.py fit -c configs/sft/demo.yaml
    lit-rlhf fit -c configs/sft/gpt-neox-20b-imdb.yaml --trainer.devices=8
    python train.py pipeline --output_dir runs/pipeline     (see lit_rlhf.pipeline)
"""

from __future__ import annotations

import os
import sys

import lightning as L
import torch
from lightning.pytorch.cli import LightningCLI

from lit_rlhf.callbacks import NonFiniteLossError
from lit_rlhf.config_files import expand_config_includes


def _default_precision() -> str:
    # bf16 mixed precision wherever the GPU supports it; CPUs default to full fp32.
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    return "32-true"


class LitRLHFCLI(LightningCLI):
    """LightningCLI with the data <-> model links every stage needs."""

    # data init arg -> module init arg, copied before instantiation so the module can check
    # them at construction, before any weights load.
    DATA_TO_MODEL = {"seq_length": "seq_length", "batch_size": "rollout_batch_size"}

    def before_instantiate_classes(self) -> None:
        config = self.config.get(self.subcommand, self.config) if self.subcommand else self.config
        model_args, data_args = config.model.init_args, config.data.init_args
        for source, target in self.DATA_TO_MODEL.items():
            if target in model_args and source in data_args and model_args[target] is None:
                model_args[target] = data_args[source]

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        # The datamodule tokenizes with the model's tokenizer (one source of truth).
        if getattr(self.datamodule, "tokenizer", "absent") is None:
            self.datamodule.tokenizer = self.model.tokenizer


def main(args: list[str] | None = None) -> None:
    """Entry point of ``python train.py`` and the ``lit-rlhf`` console script."""
    argv = sys.argv[1:] if args is None else list(args)
    # The demo's names (demo, demo-tiny, demo-sft, demo-rm) also come through the package's
    # entry point; registering here keeps them working from a source tree that is not installed.
    from lit_rlhf.demo.models import register

    register()
    if argv[:1] == ["pipeline"]:
        from lit_rlhf import pipeline

        pipeline.main(argv[1:])
        return
    try:
        if args is None:
            # LightningCLI reads sys.argv (and warns when given both it and `args`).
            sys.argv[1:] = expand_config_includes(sys.argv[1:])
        else:
            args = expand_config_includes(list(args))
        LitRLHFCLI(
            L.LightningModule,
            L.LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            trainer_defaults={"precision": _default_precision()},
            # Re-running into the same log dir must not crash on an existing config.yaml.
            save_config_kwargs={"overwrite": True},
            args=args,
        )
    except (NonFiniteLossError, ValueError, FileNotFoundError) as err:
        if os.environ.get("LIT_RLHF_DEBUG"):
            raise
        # Bad input and diverged runs end with one readable line, not a traceback.
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2 if not isinstance(err, NonFiniteLossError) else 1)


if __name__ == "__main__":
    main()
