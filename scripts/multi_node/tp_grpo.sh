#!/usr/bin/env bash
# TP-GRPO on several machines; run once on every machine with that machine's rank.
#
#   MASTER_ADDR=10.0.0.1 NUM_MACHINES=4 bash scripts/multi_node/tp_grpo.sh RANK [--config.KEY=VALUE ...]
#
# Knobs: MASTER_ADDR, NUM_MACHINES (required), NUM_PROCESSES (total over all machines), MASTER_PORT,
# MODEL_NAME, REWARD, PRESET, BETA, DRY_RUN (see scripts/launch_common.sh).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../launch_common.sh"
launch_multi_node tp_grpo "$@"
