"""``python -m lit_rlhf.export RUN_DIR OUT_DIR [--dtype bfloat16]`` (also ``lit-rlhf export``, which
calls :func:`main`): a finished run as a plain HF model (see :func:`lit_rlhf.export.export_run`).
The command lives with the export, below the CLI: nothing here imports :mod:`lit_rlhf.cli`."""

from __future__ import annotations

import os
import sys

from lit_rlhf.export import export_run
from lit_rlhf.recipes import OneLineParser


def main(args: list[str] | None = None) -> None:
    """``lit-rlhf export RUN_DIR OUT_DIR [--dtype bfloat16]`` (``python -m lit_rlhf.export``)."""
    parser = OneLineParser(prog="lit-rlhf export", description="Merge a run's LoRA adapter into its base and save in HF format.")
    parser.add_argument("run_dir", help="a finished run: lightning_logs/version_N")
    parser.add_argument("out_dir", help="where to write the merged model (replaced atomically)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                        help="weights dtype of the merged model (default: the run's lm.dtype)")
    opts = parser.parse_args(args)
    try:
        print(export_run(opts.run_dir, opts.out_dir, opts.dtype))
    except (FileNotFoundError, ValueError, OSError) as err:
        if os.environ.get("LIT_RLHF_DEBUG"):
            raise
        # A missing or unfinished run, or a damaged adapter: bad input, one line, exit 2, nothing
        # half-written.
        print(f"error: {str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__}",
              file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
