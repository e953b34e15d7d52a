#!/usr/bin/env bash
# Run the demo on CPU (creates ./.venv with the tested versions on first use).
# Outputs go under ${1:-runs/demo}.
source "$(dirname "$0")/venv.sh"
out="${1:-runs/demo}"
exec python train.py fit -c configs/sft/demo.yaml --trainer.default_root_dir="$out"
