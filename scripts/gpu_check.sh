#!/usr/bin/env bash
# The prepared GPU check (issue 13 item 4): run from the repository root on one H100/H200.
#   bash scripts/gpu_check.sh            # real size, under 8 minutes
#   bash scripts/gpu_check.sh --dry-run  # tiny sizes on the CPU
# Needs torch, diffusers, transformers, accelerate, peft, ml_collections importable by python3;
# writes gpu_check.txt / gpu_check.json to $OUT when set.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec python3 -m flow_grpo.bench.gpu_check "$@"
