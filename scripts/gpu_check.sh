#!/usr/bin/env bash
# The GPU check: what a CPU cannot show, on one CUDA GPU, in one command (under 8 minutes on one H100).
#
#   bash scripts/gpu_check.sh [--wheels DIR] [--out DIR]   run the CUDA tests and the quick GPU benchmark
#   bash scripts/gpu_check.sh --download DIR [PYVER]       fetch the wheels it may need (network; PYVER 3.12)
#
# It runs in a ready-made CUDA environment that has torch, lightning, transformers, peft,
# torchmetrics and accelerate (older minor versions too: torch 2.11, transformers 5.17). What such an
# environment often lacks (bitsandbytes, jsonargparse, torchdata, datasets and what they import,
# datasets' binary pyarrow, pandas and xxhash included: see CARRIED) comes from the wheels in DIR
# (default: .whl), each only where the environment lacks its module, installed with
# `pip install --no-index --no-deps --target` into a temporary folder: no network, nothing changed in
# the environment. Prints one line per check and a summary; exits 1 if a check failed or no GPU is
# visible. Logs and the benchmark's JSON go to --out (default: gpu_check_out).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# What the environment may lack, as MODULE=WHEEL-SPEC (the versions the tests pass with): lit_rlhf's
# dependencies beyond the ready-made stack, and everything `import datasets` loads that torch,
# transformers and lightning do not bring (pyarrow, pandas and its python-dateutil, xxhash, dill,
# multiprocess; fsspec comes with torch but is listed for an environment without it).
CARRIED=(bitsandbytes=bitsandbytes==0.50.2 jsonargparse=jsonargparse==4.53.0
         docstring_parser=docstring-parser==0.18.0 typeshed_client=typeshed-client==2.15.0
         torchdata=torchdata==0.11.0 datasets=datasets==5.2.0 pyarrow=pyarrow==26.0.1 pandas=pandas==3.1.2
         dateutil=python-dateutil==4.0.0 xxhash=xxhash==4.1.0 dill=dill==0.4.1 multiprocess=multiprocess==0.70.19
         fsspec=fsspec==2026.9.0)

if [ "${1:-}" = "--download" ]; then
  dir=${2:?usage: gpu_check.sh --download DIR [PYVER]}; pyver=${3:-3.12}
  mkdir -p "$dir"
  for entry in "${CARRIED[@]}"; do
    spec=${entry#*=}
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$pyver" --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 --platform any -d "$dir" "$spec" || { echo "gpu_check: cannot download $spec"; exit 1; }
  done
  echo "gpu_check: wheels for Python $pyver in $dir ($(du -sh "$dir" | cut -f1))"
  exit 0
fi

wheels=.whl; out=gpu_check_out
while [ $# -gt 0 ]; do
  case "$1" in
    --wheels) wheels=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    *) echo "gpu_check: unknown argument $1 (see the top of scripts/gpu_check.sh)"; exit 2 ;;
  esac
done
mkdir -p "$out"
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}

passed=0; failed=0
check() {  # check NAME STATUS DETAIL: one line per check
  if [ "$2" = PASS ]; then passed=$((passed + 1)); else failed=$((failed + 1)); fi
  printf '%-4s %-58s %s\n' "$2" "$1" "$3"
}

# 1. A GPU, or one line and exit 1: nothing below would mean anything without one.
#    LIT_RLHF_GPU_TEST_DEVICE=cpu is a dry run of this script itself on a CPU (the same tests on
#    the CPU, the benchmark's tiny shapes): for checking the script, not the GPU paths.
workload=gpu
if [ "${LIT_RLHF_GPU_TEST_DEVICE:-cuda}" = cpu ]; then
  check "cuda device" PASS "none: a dry run on the CPU (LIT_RLHF_GPU_TEST_DEVICE=cpu)"
  workload=gpu-tiny
elif ! gpu=$("$PY" -c "import torch; assert torch.cuda.is_available(); print(torch.cuda.get_device_name())" 2>/dev/null); then
  echo "gpu_check: FAILED: no CUDA GPU is visible to $PY (torch.cuda.is_available() is False, or no torch); run this on a GPU machine"
  exit 1
else
  check "cuda device" PASS "$gpu"
fi

# 2. The packages the environment lacks, from the carried wheels (never from the network).
missing=$("$PY" - "${CARRIED[@]}" <<'EOF'
import importlib.util, sys
carried = dict(entry.split("=", 1) for entry in sys.argv[1:])  # module -> wheel spec
print(" ".join(spec.split("==")[0] for module, spec in carried.items() if importlib.util.find_spec(module) is None))
EOF
)
if [ -n "$missing" ]; then
  site=$(mktemp -d)
  files=()
  for name in $missing; do
    found=$(ls "$wheels"/$(echo "$name" | tr - _)-*.whl 2>/dev/null | head -1)  # python-dateutil: python_dateutil-*
    [ -n "$found" ] && files+=("$found")
  done
  if [ ${#files[@]} -gt 0 ] && "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
       --target "$site" "${files[@]}" >"$out/pip.log" 2>&1; then
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
  fi
fi
if versions=$("$PY" -c "
import bitsandbytes, datasets, jsonargparse, lightning, peft, torch, torchdata, transformers, lit_rlhf
print(' '.join(f'{m.__name__} {m.__version__}' for m in (torch, lightning, transformers, peft, bitsandbytes)))" 2>"$out/imports.log"); then
  check "packages" PASS "$versions"
else
  check "packages" FAIL "$(tail -1 "$out/imports.log") (missing: ${missing:-none}; wheels from $wheels: bash scripts/gpu_check.sh --download $wheels)"
fi

# 3. The CUDA tests: every stage through the Trainer (tests/test_gpu.py), one line each.
COLUMNS=250 "$PY" -m pytest -m gpu tests/test_gpu.py -q -rA -p no:cacheprovider >"$out/tests.log" 2>&1
while read -r status name rest; do
  check "${name#tests/test_gpu.py::}" "$([ "$status" = PASSED ] && echo PASS || echo FAIL)" "${rest#- }"
done < <(grep -E '^(PASSED|FAILED|ERROR) ' "$out/tests.log")
grep -qE '^(PASSED|FAILED|ERROR) ' "$out/tests.log" || check "gpu tests" FAIL "none ran: $(tail -1 "$out/tests.log")"

# 4. The quick GPU benchmark: SFT MFU of a 1.1B Llama, peak memory of a 1.1B 4-bit PPO step.
start=$SECONDS
if "$PY" benchmarks/run.py --workload $workload --quick --out "$out/gpu.json" >"$out/bench.log" 2>&1; then
  figures=$("$PY" - "$out/gpu.json" <<'EOF'
import json, sys
results = json.load(open(sys.argv[1]))
wanted = ("sft_mfu", "sft_tokens_per_s", "ppo_nf4_lora_peak")
print(", ".join(f"{k} {v}" for k, v in results.items() if k.startswith(wanted)))
EOF
)
  check "benchmark --workload $workload --quick" PASS "$figures ($((SECONDS - start)) s)"
else
  check "benchmark --workload $workload --quick" FAIL "$(tail -1 "$out/bench.log")"
fi

echo "gpu_check: $passed passed, $failed failed (logs in $out/)"
[ "$failed" -eq 0 ]
