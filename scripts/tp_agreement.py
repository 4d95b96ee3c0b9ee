"""Runs `flow_grpo.commands.tp_agreement` (the `flow-grpo-tp-agreement` command) from a checkout without installing."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from flow_grpo.commands import tp_agreement  # noqa: E402

if __name__ == "__main__":
    __doc__ = tp_agreement.__doc__  # --help shows the command's usage
    tp_agreement.main()
