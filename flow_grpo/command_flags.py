"""absl flags for the commands that take no preset (data preparation, benchmarks, the reward server).

Each such command defines its flags on its own `flags.FlagValues`, not on the global `absl.flags.FLAGS`:
several commands define flags of the same name (`--preset`, `--devices`, `--resolution`), and a test
calls a command's `main([...])` more than once in one process. `parse_flags` gives them absl's
spelling (`--name value`, `--name=value`, `--noname` for a boolean) and a `--help` that lists the flags.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from absl import flags

__all__ = ["int_list", "parse_flags"]

HELP_FLAGS = ("-h", "--help", "-help", "--helpfull", "--helpshort")


def parse_flags(
    flag_values: flags.FlagValues, argv: Sequence[str] | None, usage: str, program: str
) -> flags.FlagValues:
    """Parse `argv` (default `sys.argv[1:]`, without the program name) into `flag_values`, from their defaults.

    `--help` prints `usage` and the flags and exits with 0; an unknown flag, a bad value, a missing
    required flag or a positional argument exits with 2 and a message naming it.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if any(arg in HELP_FLAGS for arg in args):
        print(f"{usage.rstrip()}\n\nflags:\n{flag_values.get_help(prefix='  ', include_special_flags=False)}")
        raise SystemExit(0)
    flag_values.unparse_flags()
    try:
        rest = flag_values([program, *args])
    except flags.Error as error:
        print(f"{program}: error: {error}\nPass --help to list the flags.", file=sys.stderr)
        raise SystemExit(2) from None
    if len(rest) > 1:
        print(f"{program}: error: unexpected arguments {rest[1:]}; every option is a --flag", file=sys.stderr)
        raise SystemExit(2)
    return flag_values


def int_list(values: Sequence[str] | None, name: str) -> tuple[int, ...] | None:
    """The integers of a `flags.DEFINE_list` value (`None` stays `None`); a non-integer exits naming `--name`."""
    if values is None:
        return None
    try:
        return tuple(int(value) for value in values if value.strip())
    except ValueError:
        print(f"error: --{name} takes comma-separated integers, e.g. 18,36,54; got {','.join(values)}", file=sys.stderr)
        raise SystemExit(2) from None
