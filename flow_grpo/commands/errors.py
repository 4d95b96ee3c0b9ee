"""One clean line for every mistake a user can fix: `error: <what is wrong>; <what to do>`, exit code 2.

A mistake in the input (a config value, a prompt file, a checkpoint, a preset, the run directory)
ends the program with that one line on stderr. `--debug` on the command line, or
`FLOW_GRPO_DEBUG=1` in the environment, shows the traceback instead. Anything else is a
programming error and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sys
from collections.abc import Iterator

from flow_grpo.data import PromptFileError
from flow_grpo.run.checkpoint_files import CheckpointError
from flow_grpo.run.config_checks import ConfigError
from flow_grpo.run.files import SymlinkRefusedError

__all__ = ["DEBUG_ENV", "DEBUG_FLAG", "USER_ERRORS", "debug_requested", "exit_with_error", "user_errors"]

DEBUG_FLAG = "--debug"
DEBUG_ENV = "FLOW_GRPO_DEBUG"
USER_ERRORS = (ConfigError, CheckpointError, PromptFileError, SymlinkRefusedError)
"""Errors whose message names the input and the fix (they never need a traceback)."""

_USER_ERRNOS = (errno.ENOSPC, errno.EACCES, errno.EROFS, errno.EDQUOT)
"""`OSError`s the user fixes: a full disk or quota, a file or directory they may not write."""


def debug_requested(argv: list[str]) -> bool:
    """True when `argv` holds `--debug` or the environment sets `FLOW_GRPO_DEBUG` to a true value."""
    return DEBUG_FLAG in argv[1:] or os.environ.get(DEBUG_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def one_line(message: str) -> str:
    """`message` on one line: line breaks become `; `."""
    return "; ".join(part.strip() for part in str(message).splitlines() if part.strip())


def exit_with_error(message: str) -> None:
    """Print `error: <message>` (one line) on stderr and exit with code 2."""
    print(f"error: {one_line(message)}", file=sys.stderr)
    sys.exit(2)


def is_user_error(error: BaseException) -> bool:
    """True for the errors of `USER_ERRORS` and the `OSError`s of a full disk or a forbidden write."""
    return isinstance(error, USER_ERRORS) or (isinstance(error, OSError) and error.errno in _USER_ERRNOS)


@contextlib.contextmanager
def user_errors(debug: bool, hint: str = "") -> Iterator[None]:
    """Turn a user error raised in the block into `error: ...` and exit code 2 (re-raised when `debug`).

    Args:
        debug: show the traceback instead (`--debug` / `FLOW_GRPO_DEBUG=1`).
        hint: appended after `; ` to the message, e.g. where the presets are listed.
    """
    try:
        yield
    except Exception as error:
        if debug or not is_user_error(error):
            raise
        message = str(error) if not isinstance(error, OSError) or error.strerror is None or error.filename is None else (
            f"{error.filename}: {error.strerror.lower()}; free space or choose another config.logdir"
        )
        exit_with_error(f"{message.rstrip().rstrip('.')}; {hint}" if hint else message)
