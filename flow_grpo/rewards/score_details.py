"""Per-image details a reward returns beside its score (GenEval's strict and official correctness, ...).

A reward normally returns its scores as a float32 ``(N,)`` tensor. A reward that also measures other
per-image quantities returns a mapping instead::

    {"score": (N,) the reward, "<detail>": (N,), ...}

and declares the detail names it always returns in its ``detail_names`` attribute, so that every
batch (and every process) carries the same keys. :class:`~flow_grpo.rewards.registry.MultiReward`
reports a detail of reward ``r`` as ``"r/<detail>"``; it never enters the weighted sum. A detail is
NaN where it does not apply to the image (a per-task accuracy on an image of another task); the
trainer and the evaluation average each detail over the images where it is finite.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

__all__ = [
    "GENEVAL_DETAILS",
    "GENEVAL_TASKS",
    "SCORE_KEY",
    "detail_names_of",
    "split_scores",
]

SCORE_KEY = "score"
"""Key of the reward itself in a reward's mapping of scores and details."""

GENEVAL_TASKS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
"""The GenEval task tags (the ``tag`` of a prompt's metadata)."""

GENEVAL_DETAILS = (
    "strict",
    "correct",
    *(f"correct_{task}" for task in GENEVAL_TASKS),
    *(f"strict_{task}" for task in GENEVAL_TASKS),
)
"""Details of the GenEval scorer: 0/1 strict and official correctness, overall and per task (NaN off-task)."""


def detail_names_of(reward: Any) -> tuple[str, ...]:
    """The detail names a reward function declares (``()`` for a plain reward)."""
    names = tuple(getattr(reward, "detail_names", ()))
    if SCORE_KEY in names or len(set(names)) != len(names):
        raise ValueError(f"Detail names {names} must be distinct and must not include {SCORE_KEY!r}.")
    return names


def split_scores(
    value: torch.Tensor | Mapping[str, torch.Tensor], name: str, num: int, detail_names: Sequence[str]
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A reward's return value -> ``(score (N,), {detail: (N,)})``, float32 on the CPU.

    Args:
        value: a ``(N,)`` tensor, or a mapping with :data:`SCORE_KEY` and exactly ``detail_names``.
        name: the reward's name, for messages.
        num: the batch size ``N``.
        detail_names: the details the reward declared.

    Raises:
        ValueError: on a wrong shape, or details other than the declared ones.
    """
    if isinstance(value, Mapping):
        details = {key: item for key, item in value.items() if key != SCORE_KEY}
        if SCORE_KEY not in value or set(details) != set(detail_names):
            raise ValueError(
                f"Reward {name!r} returned the keys {sorted(value)}; it must return {SCORE_KEY!r} and exactly "
                f"its declared detail_names {sorted(detail_names)}."
            )
        score = value[SCORE_KEY]
    else:
        if detail_names:
            raise ValueError(f"Reward {name!r} declares details {list(detail_names)} but returned a plain tensor.")
        score, details = value, {}
    checked = {}
    for key, item in [(SCORE_KEY, score), *((k, details[k]) for k in detail_names)]:
        if not isinstance(item, torch.Tensor) or item.shape != (num,):
            shape = tuple(item.shape) if isinstance(item, torch.Tensor) else type(item).__name__
            raise ValueError(
                f"Reward {name!r} returned {shape} for {key!r} on a batch of {num} images; "
                f"a reward must return a tensor of shape ({num},)."
            )
        checked[key] = item.detach().to(device="cpu", dtype=torch.float32)
    score = checked.pop(SCORE_KEY)
    return score, checked
