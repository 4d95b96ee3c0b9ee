"""A logger for code that also runs as a plain library, without an ``Accelerator``.

accelerate's ``MultiProcessAdapter`` refuses to log (``RuntimeError``) until ``PartialState()`` or an
``Accelerator`` exists. The reward client and the reward server are also used on their own (a notebook,
another training framework), where a retry warning must not turn into a crash. :func:`get_logger` is
accelerate's adapter, logging with the rank prefix and ``main_process_only`` once the state exists,
and through the plain ``logging`` logger of the same name before.
"""

from __future__ import annotations

import logging
from typing import Any

from accelerate.logging import MultiProcessAdapter
from accelerate.state import PartialState

__all__ = ["LibraryLogger", "get_logger"]

_ACCELERATE_ONLY_KEYS = ("main_process_only", "in_order")


class LibraryLogger(MultiProcessAdapter):
    """accelerate's adapter once its state exists; the plain logger of the same name before."""

    def log(self, level: int, msg: object, *args: Any, **kwargs: Any) -> None:
        if PartialState._shared_state:
            super().log(level, msg, *args, **kwargs)
            return
        for key in _ACCELERATE_ONLY_KEYS:
            kwargs.pop(key, None)
        kwargs.setdefault("stacklevel", 2)
        self.logger.log(level, msg, *args, **kwargs)


def get_logger(name: str) -> LibraryLogger:
    """The :class:`LibraryLogger` of ``name`` (same arguments as ``accelerate.logging.get_logger``)."""
    return LibraryLogger(logging.getLogger(name), {})
