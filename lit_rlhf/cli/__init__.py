"""The command line: one LightningCLI for every stage, chosen by the config's class paths.

Here: the entry point (:func:`main`); ``lightning.py`` the LightningCLI subclass;
``arguments.py`` the ``-c`` files composed before LightningCLI parses; ``errors.py`` the one
line a mistake becomes. Config composition and the shipped recipes live below, in
:mod:`lit_rlhf.recipes`, and the export command in :mod:`lit_rlhf.export.__main__`, so that
estimate, the demo and export use them without importing the CLI.

    python train.py fit -c configs/sft/demo.yaml
    lit-rlhf fit -c configs/sft/gpt-neox-20b-imdb.yaml --trainer.devices=8
    python train.py pipeline --output_dir runs/pipeline     (see lit_rlhf.pipeline)
    python train.py estimate -c configs/ppo/demo.yaml --memory 24GB   (see lit_rlhf.estimate)
"""

from __future__ import annotations

import os
import sys

from lit_rlhf.cli.arguments import expand_config_includes
from lit_rlhf.recipes import MOVED_CLASSES, class_path_of

__all__ = ["LitRLHFCLI", "main", "parser_error_cause"]


def __getattr__(name: str):
    # Lightning takes seconds to import: `lit-rlhf --help` should not wait for it.
    if name == "LitRLHFCLI":
        from lit_rlhf.cli.lightning import LitRLHFCLI

        return LitRLHFCLI
    if name == "parser_error_cause":
        from lit_rlhf.cli.errors import parser_error_cause

        return parser_error_cause
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

USAGE = """usage: lit-rlhf COMMAND [ARGS]        (also: python train.py COMMAND, python -m lit_rlhf.cli COMMAND)

RLHF of causal language models with PyTorch Lightning: SFT, reward models, PPO, DPO, GRPO.

commands:
  fit        train one stage from a config: lit-rlhf fit -c sft/demo.yaml [--trainer.max_steps=...]
  validate   run a stage's validation on a model: lit-rlhf validate -c CONFIG [--ckpt_path=...]
  pipeline   the demo end to end: SFT -> reward model -> PPO, SFT -> DPO, evaluated side by side
  estimate   predicted peak memory per device of a config, without loading weights
  export     a finished run as a plain HF model: lit-rlhf export RUN_DIR OUT_DIR [--dtype bfloat16]

Recipes shipped with the package are named by their path under configs/ (sft/demo.yaml,
ppo/gpt-neox-20b-sentiment.yaml, ...). Each command takes --help; short class names work
where a class path is expected (--model.help SFTModule, class_path: PPOModule)."""


def short_class_names(argv: list[str]) -> list[str]:
    """``--model.help SFTModule``, ``--model=PPOModule`` (and a moved class's old path) with the
    full class path."""
    out = list(argv)
    for i, arg in enumerate(out):
        key, eq, value = arg.partition("=")
        short = value[:1].isupper() and value.isidentifier()  # a class name, e.g. PPOModule
        if eq and key.startswith("--") and (short or value in MOVED_CLASSES):
            out[i] = f"{key}={class_path_of(value)}"  # --model=PPOModule, --model.init_args.reward=<old path>
        elif arg.endswith(".help") and i + 1 < len(out) and "." not in out[i + 1]:
            out[i + 1] = class_path_of(out[i + 1])  # --model.help SFTModule
    return out


# Messages of the libraries underneath that say nothing a user of lit_rlhf can act on.
QUIET_WARNINGS = (
    r".*`is_gradient_checkpointing` is deprecated",  # transformers, called by peft
    r".*`gradient_checkpointing_enable` is deprecated",
    r"'set_vital' is deprecated",  # torchdata's StatefulDataLoader
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",  # lightning on torch 2.13
    r"Your `IterableDataset` has `__len__` defined",  # the packed SFT data: exact, one process per rank
    r"No seed found, seed set to 0",
    # The frozen reference copies (DPO, PPO, GRPO with full fine-tuning) are in eval mode by design.
    r"Found \d+ module\(s\) in eval mode at the start of training",
)


def quiet_dependencies() -> None:
    """Silence :data:`QUIET_WARNINGS` and Lightning's advertisement for its cloud logger."""
    import logging
    import warnings

    for pattern in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)

    class NoTips(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return "litlogger" not in record.getMessage()

    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).addFilter(NoTips())
    # bitsandbytes on an AVX512-BF16 CPU offers a hub kernel for its repacked 4-bit layout, which
    # lit_rlhf switches off (see disable_cpu_4bit_repacking): its "install kernels" line is noise.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def main(args: list[str] | None = None) -> None:
    """Entry point of ``python train.py`` and the ``lit-rlhf`` console script."""
    argv = sys.argv[1:] if args is None else list(args)
    if argv[:1] in ([], ["-h"], ["--help"]):
        print(USAGE)
        return
    quiet_dependencies()
    # The demo's names (demo, demo-tiny, demo-sft, demo-rm) also come through the package's
    # entry point; registering here keeps them working from a source tree that is not installed.
    from lit_rlhf.demo.models import register

    register()
    if argv[:1] == ["pipeline"]:
        from lit_rlhf import pipeline

        pipeline.main(argv[1:])
        return
    if argv[:1] == ["export"]:
        from lit_rlhf.export.__main__ import main as export_main

        export_main(argv[1:])
        return
    if argv[:1] == ["estimate"]:
        # Predicted peak memory from the config alone: no LightningCLI, no weights.
        from lit_rlhf import estimate

        estimate.main(argv[1:])
        return
    from lit_rlhf.callbacks import NonFiniteLossError
    from lit_rlhf.cli.errors import USER_ERRORS, RunStarted, error_line
    from lit_rlhf.cli.lightning import LitRLHFCLI, cli_kwargs

    run = RunStarted()
    try:
        if args is None:
            # LightningCLI reads sys.argv (and warns when given both it and `args`).
            sys.argv[1:] = expand_config_includes(short_class_names(sys.argv[1:]))
        else:
            args = expand_config_includes(short_class_names(list(args)))
        LitRLHFCLI(**cli_kwargs(args, trainer_defaults={"callbacks": [run]}))
    except USER_ERRORS as err:
        if os.environ.get("LIT_RLHF_DEBUG") or not run.is_one_line(err):
            raise
        # Bad input (before the run starts) and diverged runs end with one readable line, not a
        # traceback. A bad value deep in a config reaches here wrapped in jsonargparse's dump:
        # keep its cause.
        print(f"error: {error_line(err)}", file=sys.stderr)
        sys.exit(1 if isinstance(err, NonFiniteLossError) else 2)


if __name__ == "__main__":
    main()
