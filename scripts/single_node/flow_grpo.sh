#!/usr/bin/env bash
# Flow-GRPO on the GPUs of one machine.
#
#   bash scripts/single_node/flow_grpo.sh [--config.KEY=VALUE ...]
#   MODEL_NAME=flux REWARD=geneval NUM_GPUS=8 BETA=0.004 bash scripts/single_node/flow_grpo.sh
#   DRY_RUN=1 bash scripts/single_node/flow_grpo.sh     # print the resolved command only
#
# Knobs: MODEL_NAME, REWARD, PRESET, NUM_GPUS, MASTER_PORT, BETA, DRY_RUN (see scripts/launch_common.sh).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../launch_common.sh"
launch_single_node flow_grpo "$@"
