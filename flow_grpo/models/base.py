"""The model adapter interface: everything the algorithm needs from a text-to-image flow model.

The sampler, the trainer and the loss only talk to a `ModelAdapter`; what differs between model
families (text encoders, guidance, latent layout, timestep scale, LoRA targets) lives in a
subclass that calls its diffusers pipeline's own helpers.
"""

from __future__ import annotations

import abc
import os
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from accelerate.logging import get_logger
from diffusers import DiffusionPipeline

logger = get_logger(__name__)


@dataclass(frozen=True)
class PromptBatch:
    """Text conditioning of a batch: named batch-first tensors, selectable per row.

    Each adapter decides which tensors it stores (e.g. SD3: `prompt_embeds (B, L, D)` and
    `pooled (B, P)`).
    """

    tensors: dict[str, torch.Tensor]

    def __len__(self) -> int:
        return next(iter(self.tensors.values())).shape[0]

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.tensors[name]

    def select(self, index: torch.Tensor | slice) -> "PromptBatch":
        """Rows `index` (LongTensor (K,) or slice) of every tensor."""
        return PromptBatch({name: value[index] for name, value in self.tensors.items()})

    @staticmethod
    def cat(batches: list["PromptBatch"]) -> "PromptBatch":
        """Concatenate batches along the batch dimension."""
        names = batches[0].tensors.keys()
        return PromptBatch({name: torch.cat([b.tensors[name] for b in batches]) for name in names})


class ModelAdapter(abc.ABC):
    """A loaded pipeline plus the operations the algorithm needs.

    Latents handed in and out are float32; the adapter casts to the transformer's dtype for the
    forward pass. Sigmas are float32 in [0, 1].
    """

    pipeline_class: ClassVar[type[DiffusionPipeline]]
    lora_target_modules: ClassVar[list[str]]

    def __init__(self, pipeline: DiffusionPipeline, *, guidance_scale: float, max_sequence_length: int) -> None:
        self.pipeline = pipeline
        self.guidance_scale = guidance_scale
        self.max_sequence_length = max_sequence_length

    @classmethod
    def from_pretrained(
        cls,
        model: str,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        revision: str | None = None,
        **kwargs: Any,
    ) -> "ModelAdapter":
        """Load the pipeline from a hub id or local directory and freeze it.

        The transformer and text encoders are cast to `dtype`; the VAE stays float32 (decoding in
        half precision can overflow).
        """
        local = os.path.expanduser(model)
        source = local if os.path.isdir(local) else model
        logger.info(f"loading {cls.pipeline_class.__name__} from {source}")
        pipeline = cls.pipeline_class.from_pretrained(source, revision=revision or None)
        pipeline.set_progress_bar_config(disable=True)
        for name, component in pipeline.components.items():
            if isinstance(component, torch.nn.Module):
                component.requires_grad_(False)
                component.eval()
                component.to(device=device, dtype=torch.float32 if name == "vae" else dtype)
        return cls(pipeline, **kwargs)

    @property
    def transformer(self) -> torch.nn.Module:
        return self.pipeline.transformer

    @property
    def device(self) -> torch.device:
        return self.pipeline.transformer.device

    @property
    def dtype(self) -> torch.dtype:
        return self.pipeline.transformer.dtype

    @property
    def uses_cfg(self) -> bool:
        """Whether the velocity uses classifier-free guidance (two transformer rows per state)."""
        return False

    @abc.abstractmethod
    def encode_prompts(self, prompts: list[str]) -> PromptBatch:
        """Encode `prompts` (length B) into a PromptBatch of B rows."""

    @abc.abstractmethod
    def initial_latents(
        self, batch_size: int, resolution: int, generator: torch.Generator | list[torch.Generator] | None
    ) -> torch.Tensor:
        """Initial noise `x_0` at sigma 1: float32 tensor (B, ...) in the transformer's latent layout."""

    @abc.abstractmethod
    def sigmas(self, num_steps: int, resolution: int) -> torch.Tensor:
        """The scheduler's sigma grid `sigma_0 = 1 > ... > sigma_N = 0`: float32 (N+1,) on CPU."""

    @abc.abstractmethod
    def velocity(
        self,
        latents: torch.Tensor,
        sigmas: torch.Tensor,
        prompts: PromptBatch,
        transformer: torch.nn.Module | None = None,
    ) -> torch.Tensor:
        """Velocity (with guidance) at `latents` (B, ...) and per-sample `sigmas` (B,): float32 (B, ...).

        `transformer` overrides the pipeline's own (e.g. the distributed wrapper in training).
        """

    @abc.abstractmethod
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Decode final latents (B, ...) to images float32 (B, 3, H, W) in [0, 1]."""
