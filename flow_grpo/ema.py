"""Exponential moving average of the trainable (LoRA) parameters."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch


class ParameterEMA:
    """EMA of a list of parameters, updated every `every` optimizer updates.

    The decay ramps up as `min(decay, (1 + n) / (10 + n))` with `n` the number of EMA updates so
    far, so early averages are not dominated by the initial weights.
    """

    def __init__(self, parameters: Sequence[torch.nn.Parameter], *, decay: float, every: int) -> None:
        self.parameters = list(parameters)
        self.decay = decay
        self.every = every
        self.num_updates = 0
        self.shadow = [p.detach().clone().float() for p in self.parameters]

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))

    @torch.no_grad()
    def step(self, optimizer_update: int) -> None:
        """Call after optimizer update number `optimizer_update` (1-based); averages every `every`-th."""
        if optimizer_update % self.every:
            return
        decay = self.current_decay()
        for shadow, param in zip(self.shadow, self.parameters):
            shadow.lerp_(param.detach().float(), 1.0 - decay)
        self.num_updates += 1

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

    def state_dict(self) -> dict:
        return {"shadow": [s.clone() for s in self.shadow], "num_updates": self.num_updates}

    def load_state_dict(self, state: dict) -> None:
        for shadow, saved in zip(self.shadow, state["shadow"]):
            shadow.copy_(saved)
        self.num_updates = int(state["num_updates"])
