"""Exponential moving average of the trainable (LoRA) parameters.

Schedule (the published runs'): after optimizer step `k` (the count of optimizer steps taken so
far), the average is updated when `(k + 1) % every == 0`, with decay `min(decay, (1 + k) / (10 + k))`.
It runs once per optimizer step, never once per micro-batch, so it does not depend on the world
size or on gradient accumulation.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch


class ParameterEMA:
    """EMA of a list of parameters, updated on every `every`-th optimizer step (see the module docstring)."""

    def __init__(self, parameters: Sequence[torch.nn.Parameter], *, decay: float, every: int) -> None:
        self.parameters = list(parameters)
        self.decay = decay
        self.every = every
        self.shadow = [p.detach().clone().float() for p in self.parameters]

    def decay_at(self, optimizer_steps: int) -> float:
        """The decay applied after optimizer step `optimizer_steps` (ramps from 0.1 towards `decay`)."""
        return min(self.decay, (1 + optimizer_steps) / (10 + optimizer_steps))

    def updates_at(self, optimizer_steps: int) -> bool:
        """Whether the average is updated after optimizer step `optimizer_steps`."""
        return (optimizer_steps + 1) % self.every == 0

    @torch.no_grad()
    def step(self, optimizer_steps: int) -> None:
        """Call once after each optimizer step; `optimizer_steps` counts the steps taken so far (1 after the first)."""
        if not self.updates_at(optimizer_steps):
            return
        weight = 1.0 - self.decay_at(optimizer_steps)
        for shadow, param in zip(self.shadow, self.parameters):
            shadow.lerp_(param.detach().float(), weight)

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        """Temporarily load the averaged weights into the parameters (for evaluation and saving)."""
        backup = [p.detach().clone() for p in self.parameters]
        with torch.no_grad():
            for param, shadow in zip(self.parameters, self.shadow):
                param.copy_(shadow)
        try:
            yield
        finally:
            with torch.no_grad():
                for param, saved in zip(self.parameters, backup):
                    param.copy_(saved)

    def state_dict(self) -> dict[str, list[torch.Tensor]]:
        return {"shadow": [s.clone() for s in self.shadow]}

    def load_state_dict(self, state: dict[str, list[torch.Tensor]]) -> None:
        for shadow, saved in zip(self.shadow, state["shadow"]):
            shadow.copy_(saved)
