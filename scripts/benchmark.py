"""Runs `flow_grpo.commands.benchmark` (the `flow-grpo-benchmark` command) from a checkout without installing."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from flow_grpo.commands import benchmark  # noqa: E402

if __name__ == "__main__":
    sys.exit(benchmark.main())
