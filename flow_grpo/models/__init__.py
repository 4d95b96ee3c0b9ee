"""Model adapters by family name."""

from __future__ import annotations

import ml_collections
import torch

from flow_grpo.models.base import ModelAdapter, PromptEmbeds
from flow_grpo.models.flux import FluxAdapter
from flow_grpo.models.sd3 import SD3Adapter

ADAPTERS: dict[str, type[ModelAdapter]] = {"sd3": SD3Adapter, "flux": FluxAdapter}


def adapter_class(family: str) -> type[ModelAdapter]:
    """The adapter class registered under `family`; a clear error for an unknown one."""
    if family not in ADAPTERS:
        raise ValueError(f"unknown model family {family!r}; set config.pretrained.family to one of {sorted(ADAPTERS)}")
    return ADAPTERS[family]


def load_adapter(config: ml_collections.ConfigDict, device: torch.device | str, dtype: torch.dtype) -> ModelAdapter:
    """Load the pipeline named by `config.pretrained` and wrap it in its family's adapter."""
    cls = adapter_class(config.pretrained.family)
    return cls.from_pretrained(
        config.pretrained.model,
        device=device,
        dtype=dtype,
        revision=config.pretrained.revision,
        guidance_scale=config.sample.guidance_scale,
        max_sequence_length=config.pretrained.max_sequence_length,
    )


__all__ = ["ADAPTERS", "FluxAdapter", "ModelAdapter", "PromptEmbeds", "SD3Adapter", "adapter_class", "load_adapter"]
