"""Model adapters by family name.

Importing this package imports every module in it, so each adapter's `@register_adapter(family)`
runs; `adapter_class(family)` and `load_adapter(config, ...)` then find it by
`config.pretrained.family`.
"""

from __future__ import annotations

import importlib
import pkgutil

import ml_collections
import torch

from flow_grpo.models.base import BATCHED_INPUTS, ModelAdapter, PromptEmbeds, call_rows
from flow_grpo.models.registry import ADAPTERS, adapter_class, register_adapter

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

from flow_grpo.models.flux import FluxAdapter  # noqa: E402
from flow_grpo.models.flux2_klein import Flux2KleinAdapter  # noqa: E402
from flow_grpo.models.qwen_image import QwenImageAdapter  # noqa: E402
from flow_grpo.models.sd3 import SD3Adapter  # noqa: E402
from flow_grpo.models.z_image import ZImageAdapter  # noqa: E402


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


__all__ = [
    "ADAPTERS",
    "BATCHED_INPUTS",
    "Flux2KleinAdapter",
    "FluxAdapter",
    "ModelAdapter",
    "PromptEmbeds",
    "QwenImageAdapter",
    "SD3Adapter",
    "ZImageAdapter",
    "adapter_class",
    "call_rows",
    "load_adapter",
    "register_adapter",
]
