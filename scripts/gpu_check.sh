#!/usr/bin/env bash
# The prepared GPU check: run from the repository root on one H100/H200.
#   bash scripts/gpu_check.sh            # real size, under 8 minutes
#   bash scripts/gpu_check.sh --dry-run  # tiny sizes on the CPU
# Needs torch and transformers; diffusers, ml_collections, absl-py, peft and accelerate are installed
# first from the wheels in scripts/wheels/ (or $GPU_CHECK_WHEELS) when the machine lacks them.
# Writes gpu_check.txt / gpu_check.json to $OUT when set.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python3 -m flow_grpo.bench.wheels "${GPU_CHECK_WHEELS:-scripts/wheels}"
exec python3 -m flow_grpo.bench.gpu_check "$@"
