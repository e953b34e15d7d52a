"""``python -m lit_rlhf.cli ...``: the same as ``lit-rlhf`` and ``python train.py``."""

from lit_rlhf.cli import main

main()
