"""Console commands installed by `pip install .` (see setup.py); `scripts/*.py` are thin wrappers over them.

Each command module defines its absl flags at import, so each lives in its own module; the start and
the entry point they share are here, the one-line errors in `flow_grpo.commands.errors`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import ml_collections
from accelerate import PartialState

from flow_grpo.commands.errors import run_absl
from flow_grpo.commands.options import setup_logging
from flow_grpo.run.paths import resolve_config_argument, resolve_config_paths
from flow_grpo.training.trainer import use_cpu

__all__ = ["run_command", "start_command"]


def start_command(config: ml_collections.ConfigDict, *, needs_dataset: bool = True) -> PartialState:
    """Set up logging and the processes, and resolve `config`'s paths (a missing one is a `ConfigError`).

    `needs_dataset=False` (prompts given by a file or on the command line) leaves `config.dataset` unchecked.
    """
    setup_logging()
    state = PartialState(cpu=use_cpu())
    resolve_config_paths(config, dataset=needs_dataset)
    return state


def run_command(run: Callable[[list[str]], None]) -> None:
    """Console entry point: parse the flags from `sys.argv` (a relative `--config` file may be under the
    repository) and `run`; a user's mistake ends with one `error:` line and exit code 2 (`run_absl`).
    """
    sys.argv = resolve_config_argument(sys.argv)
    run_absl(run)
