#!/usr/bin/env bash
# Compatibility name for TP-GRPO: runs tp_grpo.sh next to this file.
# The reference scripts of this name launched DeepSpeed ZeRO-2 (deepspeed_zero2.yaml); this runs DDP
# (multi_gpu.yaml / multi_node.yaml), the engine the trainer supports: see scripts/launch_common.sh.
set -euo pipefail
exec bash "$(dirname "${BASH_SOURCE[0]}")/tp_grpo.sh" "$@"
