"""Runs `flow_grpo.commands.evaluate` (the `flow-grpo-evaluate` command) from a checkout without installing."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from flow_grpo.commands import evaluate  # noqa: E402

if __name__ == "__main__":
    __doc__ = evaluate.__doc__  # --help shows the command's usage
    evaluate.main()
