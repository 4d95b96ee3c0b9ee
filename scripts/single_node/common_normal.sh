#!/usr/bin/env bash
# Compatibility name for Flow-GRPO ("normal" GRPO): runs flow_grpo.sh next to this file.
set -euo pipefail
exec bash "$(dirname "${BASH_SOURCE[0]}")/flow_grpo.sh" "$@"
