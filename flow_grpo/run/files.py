"""Opening the files a run writes without following symbolic links.

A `metrics.jsonl` or `wandb_id.txt` that is a symlink would make the trainer append to, or
overwrite, a file outside the run directory. Every file the trainer writes is opened with
`O_NOFOLLOW`, so a symlink in its place is refused with an error naming the path.
"""

from __future__ import annotations

import errno
import os
from typing import IO

from flow_grpo.command_flags import UserInputError

__all__ = ["SymlinkRefusedError", "open_to_write", "refuse_symlink"]

_MODES = {
    "w": os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
    "a": os.O_WRONLY | os.O_CREAT | os.O_APPEND,
    "wb": os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
    "ab": os.O_WRONLY | os.O_CREAT | os.O_APPEND,
}


class SymlinkRefusedError(UserInputError, OSError):
    """A file the run writes is a symbolic link (it could point outside the run directory)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        super().__init__(
            errno.ELOOP,
            f"{os.fspath(path)} is a symbolic link; a run never writes through links (it could point outside "
            "the run directory); remove the link or choose another config.run_name",
        )


def refuse_symlink(path: str | os.PathLike[str]) -> None:
    """Raise `SymlinkRefusedError` when `path` is a symbolic link (for writers that take a path)."""
    if os.path.islink(path):
        raise SymlinkRefusedError(path)


def open_to_write(path: str | os.PathLike[str], mode: str = "w", encoding: str = "utf-8") -> IO:
    """`open(path, mode)` for `mode` in w, a, wb, ab, refusing a symbolic link at `path`.

    Raises:
        SymlinkRefusedError: `path` is a symbolic link (it is left untouched, as is its target).
    """
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {sorted(_MODES)}, got {mode!r}")
    try:
        descriptor = os.open(path, _MODES[mode] | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o666)
    except OSError as error:
        if error.errno == errno.ELOOP or os.path.islink(path):
            raise SymlinkRefusedError(path) from None
        raise
    if "b" in mode:
        return os.fdopen(descriptor, mode)
    return os.fdopen(descriptor, mode, encoding=encoding)
