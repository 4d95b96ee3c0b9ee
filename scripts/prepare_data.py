"""Runs `flow_grpo.commands.prepare_data` (the `flow-grpo-prepare-data` command) from a checkout without installing."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from flow_grpo.commands import prepare_data  # noqa: E402

if __name__ == "__main__":
    prepare_data.main()
