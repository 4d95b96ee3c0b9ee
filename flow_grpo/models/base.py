"""The model adapter interface: everything the algorithm needs from a text-to-image flow model.

The sampler, the trainer and the loss only talk to a `ModelAdapter`; what differs between model
families (text encoders, guidance, latent layout, timestep scale, LoRA targets) lives in a
subclass that calls its diffusers pipeline's own helpers.
"""

from __future__ import annotations

import abc
import json
import os
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from accelerate.logging import get_logger
from diffusers import DiffusionPipeline

logger = get_logger(__name__)

# Attention projections of an MMDiT block (image stream and context stream), as diffusers names them.
JOINT_ATTENTION_LORA_TARGETS = [
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
]

BATCHED_INPUTS: tuple[str, ...] = ("hidden_states", "x")
"""The transformer argument holding one row per sample: a `(B, ...)` tensor, or a list of B tensors (Z-Image's `x`)."""


def call_rows(args: tuple, kwargs: dict[str, Any]) -> int:
    """Rows of one transformer call (samples, CFG rows included), from its arguments.

    The length of the first of `BATCHED_INPUTS` passed by keyword, else of the first positional argument.
    """
    for key in BATCHED_INPUTS:
        if key in kwargs:
            return len(kwargs[key])
    return len(args[0])


@dataclass(frozen=True)
class PromptEmbeds:
    """Text conditioning of a batch: named batch-first tensors, selectable per row.

    Each adapter decides which tensors it stores (e.g. SD3: `prompt_embeds (B, L, D)` and
    `pooled (B, P)`).
    """

    tensors: dict[str, torch.Tensor]

    def __len__(self) -> int:
        return next(iter(self.tensors.values())).shape[0]

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.tensors[name]

    def select(self, index: torch.Tensor | slice) -> "PromptEmbeds":
        """Rows `index` (LongTensor (K,) or slice) of every tensor."""
        return PromptEmbeds({name: value[index] for name, value in self.tensors.items()})

    @staticmethod
    def cat(batches: list["PromptEmbeds"]) -> "PromptEmbeds":
        """Concatenate batches along the batch dimension."""
        names = batches[0].tensors.keys()
        return PromptEmbeds({name: torch.cat([b.tensors[name] for b in batches]) for name in names})


class ModelAdapter(abc.ABC):
    """A loaded pipeline plus the operations the algorithm needs.

    Latents handed in and out are float32; the adapter casts to the transformer's dtype for the
    forward pass. Sigmas are float32 in [0, 1].
    """

    family: ClassVar[str]  # the `config.pretrained.family` name, set by `@register_adapter`
    pipeline_class: ClassVar[type[DiffusionPipeline]]
    lora_target_modules: ClassVar[list[str]]
    # Image sides must be multiples of this for hub models (VAE factor 8 x token patch 2).
    default_resolution_multiple: ClassVar[int] = 16
    # The transformer `velocity` calls when given none (`flow_grpo.training.compile` sets a compiled one); None = `transformer`.
    inference_forward: Any = None
    # The text that `negative_prompt` encodes: the unconditional rows of classifier-free guidance.
    negative_prompt_text: ClassVar[str] = ""

    @classmethod
    def token_patch(cls, transformer_config: dict) -> int:
        """Latent pixels per token side (the transformer's patch size, or the packing factor)."""
        return int(transformer_config.get("patch_size", 1))

    @classmethod
    def vae_factor(cls, vae_config: dict) -> int:
        """Pixels per latent pixel side of the family's VAE, from its config."""
        return 2 ** (len(vae_config["block_out_channels"]) - 1)

    @classmethod
    def resolution_multiple(cls, model: str) -> int:
        """The image side must be a multiple of this: VAE factor x token patch.

        Read from the component configs of a local pipeline directory without loading weights;
        the family's default for a hub id.
        """
        root = os.path.expanduser(model)
        if not os.path.isdir(root):
            return cls.default_resolution_multiple
        with open(os.path.join(root, "vae", "config.json")) as f:
            vae = json.load(f)
        with open(os.path.join(root, "transformer", "config.json")) as f:
            transformer = json.load(f)
        return cls.vae_factor(vae) * cls.token_patch(transformer)

    def __init__(self, pipeline: DiffusionPipeline, *, guidance_scale: float, max_sequence_length: int) -> None:
        self.pipeline = pipeline
        self.guidance_scale = guidance_scale
        self.max_sequence_length = max_sequence_length
        self.text_encoders_offloaded = False
        self._negative: PromptEmbeds | None = None

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
        pipeline = cls.pipeline_class.from_pretrained(
            source, revision=revision or None, dtype={"default": dtype, "vae": torch.float32}
        )
        pipeline.set_progress_bar_config(disable=True)
        for component in pipeline.components.values():
            if isinstance(component, torch.nn.Module):
                component.requires_grad_(False)
                component.eval()
                component.to(device=device)
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

    def text_encoders(self) -> list[torch.nn.Module]:
        """The pipeline's text encoders (its `text_encoder*` components that are set)."""
        return [
            module
            for name, module in self.pipeline.components.items()
            if name.startswith("text_encoder") and isinstance(module, torch.nn.Module)
        ]

    def offload_text_encoders(self) -> None:
        """Move the text encoders to the CPU; the next `encode_prompts` moves them back to the device."""
        for module in self.text_encoders():
            module.to("cpu")
        self.text_encoders_offloaded = True

    def text_encoders_to_device(self) -> None:
        """Bring offloaded text encoders back to the transformer's device (adapters call it before encoding)."""
        if self.text_encoders_offloaded:
            for module in self.text_encoders():
                module.to(self.device)
            self.text_encoders_offloaded = False

    @property
    def uses_cfg(self) -> bool:
        """Whether the velocity uses classifier-free guidance (two transformer rows per state)."""
        return False

    @classmethod
    def pipeline_guidance(cls, guidance_scale: float) -> dict[str, Any]:
        """Keyword arguments that make the family's diffusers pipeline guide as the adapter does at `guidance_scale`.

        Most pipelines take `guidance_scale` itself; a family whose pipeline names its guidance otherwise
        (Qwen-Image's `true_cfg_scale` with a negative prompt) says so here.
        """
        return {"guidance_scale": guidance_scale}

    @classmethod
    def prompt_tokens(cls, max_sequence_length: int) -> int:
        """Tokens of `prompt_embeds` for prompts encoded at `max_sequence_length` (SD3 adds its 77 CLIP tokens)."""
        return max_sequence_length

    @classmethod
    def from_components(
        cls, transformer: torch.nn.Module, vae: torch.nn.Module, scheduler: Any, *, guidance_scale: float,
        max_sequence_length: int,
    ) -> "ModelAdapter":
        """The adapter over a pipeline of `transformer`, `vae` and `scheduler` with no text encoders or tokenizers.

        For byte counting and benchmarks: prompt embeddings then come from elsewhere (`prompt_shapes`).
        """
        modules, _ = cls.pipeline_class._get_signature_keys(cls.pipeline_class)
        parts = {name: None for name in modules}
        parts.update(transformer=transformer, vae=vae, scheduler=scheduler)
        return cls(cls.pipeline_class(**parts), guidance_scale=guidance_scale, max_sequence_length=max_sequence_length)

    @classmethod
    def component_class(cls, name: str) -> type:
        """The class the family's pipeline takes as component `name` (e.g. "transformer", "vae")."""
        return cls.pipeline_class._get_signature_types()[name][0]

    @abc.abstractmethod
    def prompt_shapes(self, text_tokens: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Per-row shape and dtype of each PromptEmbeds tensor for a prompt of `text_tokens` tokens.

        Every token is kept, so per-token masks are left out (a PromptEmbeds without its mask means
        all tokens are valid); the memory preflight builds its placeholder prompts from this.
        """

    @abc.abstractmethod
    def _encode(self, prompts: list[str]) -> PromptEmbeds:
        """Encode `prompts` (length B) into a PromptEmbeds of B rows with the family's text encoders.

        Implementations call `text_encoders_to_device()` first and compute everything else they
        need from the text encoders here, so the encoders may be offloaded afterwards.
        """

    def encode_prompts(self, prompts: list[str]) -> PromptEmbeds:
        """Encode `prompts` (length B) into a PromptEmbeds of B rows.

        Under CFG the negative prompt is encoded (and cached) first, while the text encoders are on
        the device.
        """
        if self.uses_cfg:
            self.negative_prompt()
        return self._encode(list(prompts))

    def negative_prompt(self) -> PromptEmbeds:
        """Embeddings of `negative_prompt_text` (1 row), computed once."""
        if self._negative is None:
            self._negative = self._encode([self.negative_prompt_text])
        return self._negative

    @abc.abstractmethod
    def initial_latents(
        self, batch_size: int, resolution: int, generator: torch.Generator | list[torch.Generator] | None
    ) -> torch.Tensor:
        """Initial noise `x_0` at sigma 1: float32 tensor (B, ...) in the transformer's latent layout."""

    def pipeline_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """`latents` (B, ...) in the layout the family's diffusers pipeline takes as `latents=`.

        The identity where the adapter keeps the pipeline's own layout (SD3, FLUX.1); families whose
        pipeline packs the noise it is given (FLUX.2) unpack here.
        """
        return latents

    @abc.abstractmethod
    def sigmas(self, num_steps: int, resolution: int) -> torch.Tensor:
        """The scheduler's sigma grid `sigma_0 = 1 > ... > sigma_N = 0`: float32 (N+1,) on CPU."""

    @abc.abstractmethod
    def velocity(
        self,
        latents: torch.Tensor,
        sigmas: torch.Tensor,
        prompts: PromptEmbeds,
        transformer: torch.nn.Module | None = None,
    ) -> torch.Tensor:
        """Velocity (with guidance) at `latents` (B, ...) and per-sample `sigmas` (B,): float32 (B, ...).

        `transformer` overrides the pipeline's own (e.g. the distributed wrapper in training).
        """

    @abc.abstractmethod
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Decode final latents (B, ...) to images float32 (B, 3, H, W) in [0, 1]."""

    def _decode_scaled(self, latents: torch.Tensor) -> torch.Tensor:
        """Decode VAE latents (B, C, h, w), normalised by the VAE's `scaling_factor` and `shift_factor`
        (SD3, FLUX.1, Z-Image), to images float32 (B, 3, H, W) in [0, 1]."""
        vae = self.pipeline.vae
        scaled = latents.to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
        images = vae.decode(scaled, return_dict=False)[0]
        return self.pipeline.image_processor.postprocess(images, output_type="pt").float()
