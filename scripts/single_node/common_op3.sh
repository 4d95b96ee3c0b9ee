#!/usr/bin/env bash
# Compatibility name for TP-GRPO: runs tp_grpo.sh next to this file.
set -euo pipefail
exec bash "$(dirname "${BASH_SOURCE[0]}")/tp_grpo.sh" "$@"
