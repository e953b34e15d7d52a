"""The command line: one LightningCLI for every stage, chosen by the config's class paths.

Here: the entry point (:func:`main`); ``lightning.py`` the LightningCLI subclass;
``config_files.py`` config composition and the recipes shipped in the package; ``errors.py``
the one line a mistake becomes; ``export.py`` the export command.

    python train.py fit -c configs/sft/demo.yaml
    lit-rlhf fit -c configs/sft/gpt-neox-20b-imdb.yaml --trainer.devices=8
    python train.py pipeline --output_dir runs/pipeline     (see lit_rlhf.pipeline)
    python train.py estimate -c configs/ppo/demo.yaml --memory 24GB   (see lit_rlhf.estimate)
"""

from __future__ import annotations

import os
import sys

from lit_rlhf.callbacks import NonFiniteLossError
from lit_rlhf.cli.config_files import expand_config_includes
from lit_rlhf.cli.errors import USER_ERRORS, error_line, parser_error_cause
from lit_rlhf.cli.lightning import LitRLHFCLI, cli_kwargs

__all__ = ["LitRLHFCLI", "main", "parser_error_cause"]


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
    if argv[:1] == ["export"]:
        from lit_rlhf.cli import export

        export.main(argv[1:])
        return
    if argv[:1] == ["estimate"]:
        # Predicted peak memory from the config alone: no LightningCLI, no weights.
        from lit_rlhf import estimate

        estimate.main(argv[1:])
        return
    try:
        if args is None:
            # LightningCLI reads sys.argv (and warns when given both it and `args`).
            sys.argv[1:] = expand_config_includes(sys.argv[1:])
        else:
            args = expand_config_includes(list(args))
        LitRLHFCLI(**cli_kwargs(args))
    except USER_ERRORS as err:
        if os.environ.get("LIT_RLHF_DEBUG"):
            raise
        # Bad input and diverged runs end with one readable line, not a traceback. A bad
        # value deep in a config reaches here wrapped in jsonargparse's dump: keep its cause.
        print(f"error: {error_line(err)}", file=sys.stderr)
        sys.exit(1 if isinstance(err, NonFiniteLossError) else 2)


if __name__ == "__main__":
    main()
