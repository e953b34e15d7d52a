#!/usr/bin/env bash
# Run the whole RLHF pipeline demo on CPU: SFT -> reward model -> PPO -> evaluation.
# Creates ./.venv with the tested versions on first use. Outputs go under ${1:-runs/demo}
# (relative to the repository root).
source "$(dirname "$0")/venv.sh"
out="${1:-runs/demo}"
exec python train.py pipeline --output_dir "$out"
