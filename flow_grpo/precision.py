"""Names of floating-point dtypes used in configs, flags and reward options, in one place."""

from __future__ import annotations

import torch

# `config.mixed_precision` (accelerate's names) -> the dtype of the frozen weights.
MIXED_PRECISION_DTYPES: dict[str, torch.dtype] = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# Long names, as reward options spell them.
DTYPE_NAMES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def mixed_precision_dtype(name: str) -> torch.dtype:
    """The weight dtype of `config.mixed_precision`; a clear error for an unknown name."""
    if name not in MIXED_PRECISION_DTYPES:
        raise ValueError(f"config.mixed_precision must be one of {sorted(MIXED_PRECISION_DTYPES)}, got {name!r}")
    return MIXED_PRECISION_DTYPES[name]
