"""CUDA's autocast dtypes in CPU traces: the normalisations that CUDA autocast runs in float32.

The memory preflight traces under fake tensors on the CPU, with CPU autocast standing in for
the trainer's CUDA autocast. The two policies differ where memory matters: CUDA autocast casts
`layer_norm` and `group_norm` to float32 (torch's "Automatic Mixed Precision" docs, "CUDA Ops
that can autocast to float32"), CPU autocast leaves them in the lower precision. The VAE decoder
is a stack of group norms at full image resolution, so a bf16 trace of it saw about 60 % of the
bytes a GPU allocates (SD3 VAE, 512²: 0.375 against 0.625 GiB per image); the transformer's
layer norms add about 8 % to the update's traced bytes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["FLOAT32_OPS", "cuda_autocast", "float32_norms"]

FLOAT32_OPS: tuple[str, ...] = ("group_norm", "layer_norm")
"""`torch.nn.functional` normalisations CUDA autocast runs in float32 (the ones these models call)."""


def _float32(value: Any) -> Any:
    return value.float() if isinstance(value, torch.Tensor) and value.is_floating_point() else value


def _in_float32(function: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """`function` with floating-point tensor arguments cast to float32 while CPU autocast is on (its output float32)."""

    def cast(*args: Any, **kwargs: Any) -> torch.Tensor:
        if not torch.is_autocast_enabled("cpu"):
            return function(*args, **kwargs)
        with torch.autocast("cpu", enabled=False):
            return function(*map(_float32, args), **{key: _float32(value) for key, value in kwargs.items()})

    return cast


@contextlib.contextmanager
def float32_norms() -> Iterator[None]:
    """`FLOAT32_OPS` run in float32 whenever CPU autocast is on, for the duration of the block.

    They are swapped in `torch.nn.functional` (the preflight traces in one thread before any model
    is loaded) and restored afterwards. A backward that recomputes checkpointed activations must
    run inside it too, so the recomputation sees the forward's dtypes.
    """
    originals = {name: getattr(F, name) for name in FLOAT32_OPS}
    try:
        for name, function in originals.items():
            setattr(F, name, _in_float32(function))
        yield
    finally:
        for name, function in originals.items():
            setattr(F, name, function)


@contextlib.contextmanager
def cuda_autocast(dtype: torch.dtype) -> Iterator[None]:
    """CPU autocast to `dtype` with CUDA's float32 normalisations (`float32_norms`); float32 = no autocast."""
    if dtype == torch.float32:
        yield
        return
    with float32_norms(), torch.autocast("cpu", dtype=dtype):
        yield
