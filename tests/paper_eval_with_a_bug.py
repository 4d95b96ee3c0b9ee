"""`flow-grpo-paper-eval` whose evaluation fails with a plain `ValueError`, as a bug in it would.

Run by `tests/test_command_errors.py` (as `python -m tests.paper_eval_with_a_bug ARGS`): the command
must show the traceback, not turn the bug into a one-line user error.
"""

import runpy

from flow_grpo.paper import runner


def _broken(*args, **kwargs):
    raise ValueError("a bug")


runner.run_paper_evaluation = _broken
runpy.run_module("flow_grpo.commands.paper_eval", run_name="__main__", alter_sys=True)
