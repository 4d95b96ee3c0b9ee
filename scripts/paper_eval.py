"""Runs `flow_grpo.commands.paper_eval` (the `flow-grpo-paper-eval` command) from a checkout without installing."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from flow_grpo.commands import paper_eval  # noqa: E402

if __name__ == "__main__":
    __doc__ = paper_eval.__doc__  # --help shows the command's usage
    paper_eval.main()
