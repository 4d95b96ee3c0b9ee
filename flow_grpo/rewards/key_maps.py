"""Renaming a published checkpoint's state-dict keys to the modules that score with it, and back.

A published reward checkpoint names its tensors after the authors' modules; the in-project scorers run
the same architecture with transformers' classes, whose parameters are named differently. A
:class:`KeyMap` is a list of template pairs ``(published, module)`` such as
``("blocks.{i}.attn.proj.{p}", "encoder.layers.{i}.self_attn.projection.{p}")``: ``{i}`` stands for a
layer index, ``{p}`` for ``weight`` or ``bias`` and ``{rest}`` for any remainder. The same table
renames a published checkpoint for loading and, in reverse, writes the tiny test checkpoints in the
published layout (:mod:`flow_grpo.testing.preference_models`), so both directions agree by construction.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch

__all__ = ["KeyMap"]

_PLACEHOLDERS = {"{i}": r"(?P<i>\d+)", "{p}": r"(?P<p>weight|bias)", "{rest}": r"(?P<rest>.+)"}


def _pattern(template: str) -> re.Pattern[str]:
    """A template -> an anchored regex whose groups are its placeholders."""
    parts = re.split(r"(\{i\}|\{p\}|\{rest\})", template)
    return re.compile("".join(_PLACEHOLDERS.get(part, re.escape(part)) for part in parts) + r"\Z")


class KeyMap:
    """Template pairs ``(published, module)``; the first pair whose side matches a key renames it."""

    def __init__(self, pairs: Sequence[tuple[str, str]]) -> None:
        self.pairs = list(pairs)
        self._forward = [(_pattern(published), module) for published, module in self.pairs]
        self._backward = [(_pattern(module), published) for published, module in self.pairs]

    @staticmethod
    def _rename(key: str, rules: list[tuple[re.Pattern[str], str]]) -> str | None:
        for pattern, template in rules:
            match = pattern.match(key)
            if match:
                name = template
                for group, value in match.groupdict().items():
                    name = name.replace("{" + group + "}", value)
                return name
        return None

    def to_module(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Published keys -> module keys; keys no pair matches are left out (the caller checks what is missing)."""
        renamed = {}
        for key, tensor in state.items():
            name = self._rename(key, self._forward)
            if name is not None:
                renamed[name] = tensor
        return renamed

    def to_published(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Module keys -> published keys; every key must match a pair."""
        renamed = {}
        for key, tensor in state.items():
            name = self._rename(key, self._backward)
            if name is None:
                raise KeyError(f"no published name for the module parameter {key!r}")
            renamed[name] = tensor
        return renamed
