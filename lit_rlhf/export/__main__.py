"""``python -m lit_rlhf.export RUN_DIR OUT_DIR [--dtype bfloat16]``: the command lives with the CLI."""

from lit_rlhf.cli.export import main

main()
