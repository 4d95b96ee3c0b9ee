"""One clean line for every mistake a user can fix: `error: <what is wrong>; <what to do>`, exit code 2.

Every command runs under this module: the absl commands that take a `--config` preset (training,
generation, evaluation, the paper table, the agreement report) through `run_absl`, the others
(data preparation, benchmarks, the memory preflight, the reward server) through `command_main`.
A mistake in the input (a flag, a config value, a preset, a prompt file, a checkpoint, the run
directory: any `UserInputError`, or a full disk or a forbidden write) ends the program with that
one line on stderr. `--debug` on the command line, or `FLOW_GRPO_DEBUG=1` in the environment,
shows the traceback instead. Anything else is a programming error and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

from absl import app, flags
from ml_collections.config_flags.config_flags import is_config_flag

from flow_grpo.command_flags import (
    DEBUG_ENV,
    DEBUG_FLAG,
    InputValueError,
    UserInputError,
    debug_requested,
    exit_with_error,
)
from flow_grpo.run.config_checks import ConfigError

__all__ = [
    "DEBUG_ENV",
    "DEBUG_FLAG",
    "PRESET_ERRORS",
    "command_main",
    "debug_requested",
    "exit_with_error",
    "flag_error_message",
    "input_errors",
    "run_absl",
    "unknown_key_message",
    "user_errors",
]

_USER_ERRNOS = {
    errno.ENOSPC: "free space, or write somewhere else",
    errno.EDQUOT: "free space within your quota, or write somewhere else",
    errno.EACCES: "choose a location you may write",
    errno.EROFS: "choose a location on a writable file system",
    errno.ENOTDIR: "a part of the path is a file; choose a directory",
}
"""`OSError`s the user fixes (a full disk or quota, a place they may not write, a file where a
directory was given) and what to do."""

PRESET_PARSE_FAILURE = "Error whilst parsing config file"
PRESET_ERRORS = (ValueError, OSError, ImportError)
"""What loading a `--config=<file>:<preset>` raises for a missing file or an unknown preset."""

Main = TypeVar("Main", bound=Callable[..., "int | None"])


def is_user_error(error: BaseException) -> bool:
    """True for a `UserInputError` and the `OSError`s of a full disk or a forbidden write."""
    return isinstance(error, UserInputError) or (isinstance(error, OSError) and error.errno in _USER_ERRNOS)


def _message(error: BaseException) -> str:
    """The error's own words: an `OSError`'s path and reason without its `[Errno N]` prefix."""
    if isinstance(error, OSError) and error.strerror is not None:
        if error.filename is None:  # the message already names the path and the fix
            return error.strerror
        return f"{error.filename}: {error.strerror.lower()}; {_USER_ERRNOS.get(error.errno, 'check the path')}"
    return str(error)


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
        message = _message(error)
        exit_with_error(f"{message.rstrip().rstrip('.')}; {hint}" if hint else message)


@contextlib.contextmanager
def input_errors(*types: type[Exception]) -> Iterator[None]:
    """Within the block, an error of `types` is a mistake in the user's input: re-raised as `InputValueError`.

    For code that reports bad input with built-in errors (a preset function, a prompt source, a
    scorer's factory); keep the block to the calls whose failures are the user's to fix.
    """
    try:
        yield
    except UserInputError:
        raise
    except types as error:
        raise InputValueError(str(error)) from error


def command_main(hint: str = "") -> Callable[[Main], Main]:
    """Decorate a command's `main(argv=None)` (flags parsed by `command_flags.parse_flags`).

    The decorated `main` takes `--debug` (dropped before `main` sees the flags) and ends a user
    error with one line and exit code 2 (see `user_errors`); `hint` is appended to each message.
    """

    def decorate(main: Main) -> Main:
        @functools.wraps(main)
        def guarded(argv: Sequence[str] | None = None) -> int | None:
            args = list(sys.argv[1:] if argv is None else argv)
            with user_errors(debug_requested(args), hint):
                return main([arg for arg in args if arg != DEBUG_FLAG])

        return guarded  # type: ignore[return-value]

    return decorate


# ----------------------------------------------------------------------------- absl commands with a preset


def run_absl(run: Callable[[list[str]], None], hint: str = "") -> None:
    """Run `run` under `absl.app.run` as a console command with one-line errors (exit code 2).

    `--debug` is taken out of `sys.argv`; flag errors (an unknown key, a bad value, a preset that does
    not load), a stray positional argument and user errors inside `run` print one line. A preset file
    that does not exist fails before `run`, like an unknown preset.

    Args:
        run: the command, called with the arguments absl did not parse (the program name only).
        hint: appended to the message of a user error inside `run` and of a preset that does not load.
    """
    debug = debug_requested(sys.argv[1:])
    sys.argv = [arg for arg in sys.argv if arg != DEBUG_FLAG]

    def guarded(argv: list[str]) -> None:
        with user_errors(debug, hint):
            _load_config_flags()
            if len(argv) > 1:
                raise InputValueError(
                    f"unexpected arguments {argv[1:]}; settings are given as --config.<key>=<value> "
                    "and flags as --<flag>=<value>"
                )
            run(argv)

    app.run(guarded, flags_parser=functools.partial(_parse_absl_flags, debug=debug, hint=hint))


def _load_config_flags() -> None:
    """Load every `--config` preset now; one that does not load is a `ConfigError` naming it."""
    for name in list(flags.FLAGS):
        flag = flags.FLAGS[name]
        if is_config_flag(flag):
            try:  # a preset file that did not load leaves a placeholder that raises on any attribute
                getattr(flag.value, "is_locked", None)
            except PRESET_ERRORS as error:
                raise ConfigError(preset_message(error)) from error


def _parse_absl_flags(argv: list[str], debug: bool, hint: str) -> list[str]:
    """absl's flag parsing: an override naming a key the config lacks, a bad value or a preset that does
    not load exits with one line and code 2 (with `debug`: the traceback).
    """
    try:
        return flags.FLAGS(argv)
    except (AttributeError, KeyError, flags.Error, *PRESET_ERRORS) as error:
        if debug:
            raise
        exit_with_error(flag_error_message(argv, error, hint))


def flag_error_message(argv: Sequence[str], error: BaseException, hint: str) -> str:
    """The one-line message of a flag error: a preset that does not load (with `hint`), or an override's."""
    text = str(error)
    suffix = f"; {hint}" if hint else ""
    if PRESET_PARSE_FAILURE in text:  # ml_collections puts the preset's traceback into the message
        last = text.strip().splitlines()[-1]
        return f"--config: {last.partition(': ')[2] or last}{suffix}"
    if isinstance(error, PRESET_ERRORS):
        return f"{preset_message(error)}{suffix}"
    if isinstance(error, flags.Error):  # an unknown flag, a value of the wrong type, a missing required flag
        return f"{text}; {hint or 'run the command with --help for its flags'}"
    return unknown_key_message(argv, error)


def preset_message(error: BaseException) -> str:
    """The one-line message for a preset that does not load: the missing file, or the preset's own message."""
    while error.__cause__ is not None or error.__context__ is not None:
        error = error.__cause__ or error.__context__
    missing = re.search(r"No such file or directory: '([^']+)'", str(error))
    if isinstance(error, FileNotFoundError) or missing:
        path = error.filename if isinstance(error, FileNotFoundError) else missing.group(1)
        return f"--config: preset file {path} does not exist; give e.g. --config=config/grpo.py:<preset>"
    return f"--config: {error}"


def unknown_key_message(argv: Sequence[str], error: BaseException) -> str:
    """The message for a flag error: the override, the missing key, ml_collections' "did you mean", a fix.

    Adding a reward with `--config.reward_fn.<name>=w` cannot work (the reward dicts are locked
    like the rest of the config): the message shows the whole-dict form that does.
    """
    while error.args and isinstance(error.args[0], BaseException):
        error = error.args[0]
    text = str(error.args[0]) if error.args else str(error)
    key, _, hint = text.partition("\n")
    key = key.strip("'\"")
    overrides = [arg.split("=", 1) for arg in argv[1:] if arg.startswith("--config.")]
    matching = [(flag, value) for flag, *value in overrides if key and flag.split(".")[-1] == key]
    if not matching or isinstance(error, flags.Error):
        return text
    flag, value = matching[-1]
    parent = flag[len("--config.") :].rpartition(".")[0]
    message = f"{flag}: the config has no key {key!r}" + (f" under config.{parent}" if parent else "")
    if hint:
        message += f" ({hint.strip()})"
    if parent in ("reward_fn", "eval_reward_fn"):
        weight = value[0] if value else "1.0"
        message += (
            f"; rewards are given as a whole dict, which replaces the preset's: --config.{parent}='{{\"{key}\": {weight}}}'"
            " (list every reward you want, e.g. '{\"pickscore\": 1.0, \"aesthetic\": 0.5}')"
        )
    else:
        message += "; every key is in config/base.py (`python -m flow_grpo.train --print_config` lists them)"
    return message
