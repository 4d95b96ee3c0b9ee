"""absl flags for the commands that take no preset (data preparation, benchmarks, the reward server),
and the errors and the one error line every command shares.

Each such command defines its flags on its own `flags.FlagValues`, not on the global `absl.flags.FLAGS`:
several commands define flags of the same name (`--preset`, `--devices`, `--resolution`), and a test
calls a command's `main([...])` more than once in one process. `parse_flags` gives them absl's
spelling (`--name value`, `--name=value`, `--noname` for a boolean) and a `--help` that lists the flags.

A mistake the user can fix ends a command with one line, `error: <what is wrong>; <what to do>`, on
stderr and exit code 2 (`exit_with_error`). Errors of that kind derive from `UserInputError`, so
`flow_grpo.commands.errors` tells them from programming errors, which keep their traceback.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from absl import flags

__all__ = [
    "DEBUG_ENV",
    "DEBUG_FLAG",
    "InputNotFoundError",
    "InputValueError",
    "UserInputError",
    "debug_requested",
    "exit_with_error",
    "int_list",
    "one_line",
    "parse_flags",
]

HELP_FLAGS = ("-h", "--help", "-help", "--helpfull", "--helpshort")
DEBUG_FLAG = "--debug"
DEBUG_ENV = "FLOW_GRPO_DEBUG"


class UserInputError(Exception):
    """Base of the errors in what a user gave a command (a flag, a config key, a file, a name).

    The message names the input and says what to do; a command prints it as one `error:` line.
    Subclasses also derive from the built-in error the caller would expect (`ValueError`, ...).
    """


class InputValueError(UserInputError, ValueError):
    """A flag, option or name whose value cannot be used."""


class InputNotFoundError(UserInputError, FileNotFoundError):
    """A file or directory the user named that does not exist or does not hold what is needed."""


def debug_requested(argv: Sequence[str]) -> bool:
    """True when `argv` holds `--debug` or `FLOW_GRPO_DEBUG` is set to a true value."""
    return DEBUG_FLAG in argv or os.environ.get(DEBUG_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def one_line(message: str) -> str:
    """`message` on one line: line breaks become `; `."""
    return "; ".join(part.strip() for part in str(message).splitlines() if part.strip())


def exit_with_error(message: str) -> NoReturn:
    """Print `error: <message>` (one line) on stderr and exit with code 2."""
    print(f"error: {one_line(message)}", file=sys.stderr)
    raise SystemExit(2)


def parse_flags(
    flag_values: flags.FlagValues, argv: Sequence[str] | None, usage: str, program: str
) -> flags.FlagValues:
    """Parse `argv` (default `sys.argv[1:]`, without the program name) into `flag_values`, from their defaults.

    `--help` prints `usage` and the flags and exits with 0; an unknown flag, a bad value, a missing
    required flag or a positional argument exits with 2 and one `error:` line naming it. `--debug`
    is left to the caller (see `flow_grpo.commands.errors.command_main`).
    """
    args = [arg for arg in (sys.argv[1:] if argv is None else argv) if arg != DEBUG_FLAG]
    if any(arg in HELP_FLAGS for arg in args):
        print(f"{usage.rstrip()}\n\nflags:\n{flag_values.get_help(prefix='  ', include_special_flags=False)}")
        raise SystemExit(0)
    flag_values.unparse_flags()
    try:
        rest = flag_values([program, *args])
    except flags.Error as error:
        exit_with_error(f"{error}; run `{program} --help` for the flags")
    if len(rest) > 1:
        exit_with_error(f"unexpected arguments {rest[1:]}; every option is a --flag (run `{program} --help`)")
    return flag_values


def int_list(values: Sequence[str] | None, name: str) -> tuple[int, ...] | None:
    """The integers of a `flags.DEFINE_list` value (`None` stays `None`).

    Raises:
        InputValueError: a value that is not an integer, naming `--name`.
    """
    if values is None:
        return None
    try:
        return tuple(int(value) for value in values if value.strip())
    except ValueError:
        raise InputValueError(
            f"--{name} takes comma-separated integers, e.g. 18,36,54; got {','.join(values)}"
        ) from None
