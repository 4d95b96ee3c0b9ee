"""Registry of model adapters by family name (`config.pretrained.family`).

An adapter registers itself where it is defined::

    @register_adapter("sd3")
    class SD3Adapter(ModelAdapter):
        ...

`flow_grpo.models` imports every module of its package, so a new family is one adapter file (plus
its presets and a tiny builder in `flow_grpo.testing.pipelines`); nothing else names the families.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from flow_grpo.models.base import ModelAdapter

__all__ = ["ADAPTERS", "adapter_class", "register_adapter"]

ADAPTERS: dict[str, type[ModelAdapter]] = {}
"""Family name -> adapter class, filled by `register_adapter`."""

AdapterT = TypeVar("AdapterT", bound=type[ModelAdapter])


def register_adapter(family: str) -> Callable[[AdapterT], AdapterT]:
    """Class decorator: register a `ModelAdapter` subclass under `family` and set its `family` attribute.

    Raises:
        ValueError: when `family` is empty or already taken by another class.
        TypeError: when the decorated class is not a `ModelAdapter`.
    """
    if not family:
        raise ValueError("an adapter family needs a non-empty name")

    def register(cls: AdapterT) -> AdapterT:
        if not (isinstance(cls, type) and issubclass(cls, ModelAdapter)):
            raise TypeError(f"@register_adapter({family!r}) decorates ModelAdapter subclasses, got {cls!r}")
        registered = ADAPTERS.get(family)
        if registered is not None and registered.__qualname__ != cls.__qualname__:
            raise ValueError(f"model family {family!r} is already registered to {registered.__qualname__}")
        cls.family = family
        ADAPTERS[family] = cls
        return cls

    return register


def adapter_class(family: str) -> type[ModelAdapter]:
    """The adapter class registered under `family`; a clear error for an unknown one."""
    if family not in ADAPTERS:
        raise ValueError(f"unknown model family {family!r}; set config.pretrained.family to one of {sorted(ADAPTERS)}")
    return ADAPTERS[family]
