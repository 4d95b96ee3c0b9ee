"""Runs `flow_grpo.commands.reward_server` (the `flow-grpo-reward-server` command) from a checkout without installing."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from flow_grpo.commands import reward_server  # noqa: E402

if __name__ == "__main__":
    reward_server.main()
