#!/usr/bin/env bash
# Run the demo on CPU: SFT -> reward model -> PPO and SFT -> DPO, then every policy on the same
# held-out prompts (summary.json, report.png, samples.md). Extra arguments go to the pipeline,
# e.g. `bash scripts/demo.sh runs/demo --methods ppo,dpo,grpo`.
# Creates ./.venv with the tested versions on first use. Outputs go under ${1:-runs/demo}
# (relative to the repository root).
source "$(dirname "$0")/venv.sh"
out="${1:-runs/demo}"
shift || true
exec python train.py pipeline --output_dir "$out" "$@"
