"""Runs `flow_grpo.commands.generate` (the `flow-grpo-generate` command) from a checkout without installing."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from flow_grpo.commands import generate  # noqa: E402

if __name__ == "__main__":
    __doc__ = generate.__doc__  # --help shows the command's usage
    generate.main()
