"""Run console commands as a user runs them (`python -m <module> <args>`), many in one interpreter.

Importing the package (torch, diffusers, transformers) costs several seconds of CPU per process. A
batch pays it once: one Python process imports the heavy modules, then runs each command in its
own fork, with `sys.argv`, the environment, stdout and stderr of its own and a fresh absl flag
registry, and reports its exit code and output. A command's uncaught exception prints its
traceback and exits with 1, and `SystemExit` with a message prints it and exits with 1, as Python does.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_RUNNER = r"""
import json, os, runpy, sys, traceback
import flow_grpo.training.trainer  # noqa: F401 -- the heavy imports, once for every command
for case in json.loads(sys.stdin.read()):
    pid = os.fork()
    if pid == 0:
        os.environ.update(case["env"])
        for fd, path in ((1, case["stdout"]), (2, case["stderr"])):
            os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
        sys.argv = [case["module"], *case["args"]]
        code = 0
        try:
            runpy.run_module(case["module"], run_name="__main__", alter_sys=True)
        except SystemExit as done:
            if isinstance(done.code, int) or done.code is None:
                code = done.code or 0
            else:
                print(done.code, file=sys.stderr)
                code = 1
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    print(json.dumps({"id": case["id"], "returncode": os.waitstatus_to_exitcode(status)}), flush=True)
"""


@dataclass(frozen=True)
class Done:
    """What one command left: its exit code, stdout and stderr."""

    returncode: int
    stdout: str
    stderr: str


def run_commands(cases: dict[str, tuple[str, list[str], dict[str, str]]], timeout: float = 300) -> dict[str, Done]:
    """Run every `id -> (module, args, extra environment)` as `python -m module *args`; `id -> Done`."""
    with tempfile.TemporaryDirectory() as scratch:
        jobs = [
            {
                "id": case_id,
                "module": module,
                "args": list(args),
                "env": dict(env),
                "stdout": os.path.join(scratch, f"{index}.out"),
                "stderr": os.path.join(scratch, f"{index}.err"),
            }
            for index, (case_id, (module, args, env)) in enumerate(cases.items())
        ]
        environment = {
            **os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
        }
        environment.pop("FLOW_GRPO_DEBUG", None)
        done = subprocess.run(
            [sys.executable, "-c", _RUNNER], input=json.dumps(jobs), cwd=ROOT, env=environment,
            capture_output=True, text=True, timeout=timeout,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        codes = {row["id"]: row["returncode"] for row in map(json.loads, done.stdout.splitlines())}
        return {
            job["id"]: Done(codes[job["id"]], Path(job["stdout"]).read_text(), Path(job["stderr"]).read_text())
            for job in jobs
        }


def one_error_line(done: Done) -> str:
    """The single `error: ...; ...` line of a command that stopped on a user's mistake (exit code 2, no traceback)."""
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    lines = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "; " in lines[0], done.stderr[-3000:]
    return lines[0]
