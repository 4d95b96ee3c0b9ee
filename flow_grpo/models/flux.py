"""FLUX.1-dev adapter: CLIP pooled + T5 conditioning, embedded guidance (no CFG), 2x2-packed latents.

Latents handed in and out are the pipeline's PACKED layout, float32 (B, S, 4 C) with
`S = (H / (2 f))^2` tokens for an H x H image, VAE factor `f` and `C` latent channels, so the shared
sampler and step math work on them unchanged (the per-dimension log-prob mean is invariant to
the packing permutation). Images are square: the packed grid side is recovered from `S`.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import torch
from diffusers import FluxPipeline
from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

from flow_grpo.models.base import JOINT_ATTENTION_LORA_TARGETS, ModelAdapter, PromptEmbeds
from flow_grpo.models.registry import register_adapter


@register_adapter("flux")
class FluxAdapter(ModelAdapter):
    """FLUX with the guidance value fed to the transformer's guidance embedding, one row per state.

    PromptEmbeds tensors: `prompt_embeds` (B, L, D) from T5, `pooled` (B, P) from CLIP and
    `text_ids` (B, L, 3), the text position ids of `encode_prompt` repeated per row (all rows are
    equal; the transformer gets one (L, 3) copy).
    """

    pipeline_class = FluxPipeline
    # Suffix patterns (PEFT list semantics), the layers the published FLUX runs train: image and
    # context attention projections and both feed-forward networks of the double-stream blocks; the
    # single-stream blocks' `attn.to_q/k/v` match the same patterns.
    lora_target_modules = JOINT_ATTENTION_LORA_TARGETS + [
        "ff.net.0.proj",
        "ff.net.2",
        "ff_context.net.0.proj",
        "ff_context.net.2",
    ]

    pipeline: FluxPipeline

    @classmethod
    def token_patch(cls, transformer_config: dict) -> int:
        return 2  # latents are packed 2x2 into tokens

    def prompt_shapes(self, text_tokens: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """`prompt_embeds` (L, joint_attention_dim), `pooled` (pooled_projection_dim,) and `text_ids` (L, 3)."""
        config = self.transformer.config
        return {
            "prompt_embeds": ((text_tokens, config.joint_attention_dim), self.dtype),
            "pooled": ((config.pooled_projection_dim,), self.dtype),
            "text_ids": ((text_tokens, 3), self.dtype),
        }

    @torch.no_grad()
    def _encode(self, prompts: list[str]) -> PromptEmbeds:
        self.text_encoders_to_device()
        embeds, pooled, text_ids = self.pipeline.encode_prompt(
            prompt=list(prompts),
            prompt_2=None,
            device=self.device,
            max_sequence_length=self.max_sequence_length,
        )
        batch = embeds.shape[0]
        return PromptEmbeds(
            {
                "prompt_embeds": embeds.to(self.dtype),
                "pooled": pooled.to(self.dtype),
                "text_ids": text_ids.to(self.dtype).expand(batch, -1, -1).contiguous(),
            }
        )

    def packed_side(self, resolution: int) -> int:
        """Side of the packed token grid for a `resolution` x `resolution` image (as `prepare_latents` rounds)."""
        return resolution // (self.pipeline.vae_scale_factor * 2)

    def initial_latents(
        self, batch_size: int, resolution: int, generator: torch.Generator | list[torch.Generator] | None
    ) -> torch.Tensor:
        """Packed initial noise float32 (B, S, 4 C), drawn as the pipeline draws it (unpacked, then packed)."""
        latents, _ = self.pipeline.prepare_latents(
            batch_size,
            self.transformer.config.in_channels // 4,
            resolution,
            resolution,
            torch.float32,
            self.device,
            generator,
        )
        return latents

    def sigmas(self, num_steps: int, resolution: int) -> torch.Tensor:
        """FluxPipeline's grid: linear sigmas `1 ... 1/N`, shifted by `mu` of the image token count, then 0."""
        scheduler = copy.deepcopy(self.pipeline.scheduler)
        config = scheduler.config
        grid = None if config.get("use_flow_sigmas", False) else np.linspace(1.0, 1.0 / num_steps, num_steps)
        mu = calculate_shift(
            self.packed_side(resolution) ** 2,
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.15),
        )
        retrieve_timesteps(scheduler, num_steps, "cpu", sigmas=grid, mu=mu)
        return scheduler.sigmas.to(torch.float32).cpu()

    def _grid_side(self, latents: torch.Tensor) -> int:
        tokens = latents.shape[1]
        side = math.isqrt(tokens)
        if side * side != tokens:
            raise ValueError(f"packed latents with {tokens} tokens are not a square grid")
        return side

    def guidance(self, batch: int, device: torch.device) -> torch.Tensor | None:
        """The guidance value per row, float32 (B,), or None for a transformer without a guidance embedding."""
        if not self.transformer.config.guidance_embeds:
            return None
        return torch.full((batch,), self.guidance_scale, device=device, dtype=torch.float32)

    def velocity(
        self,
        latents: torch.Tensor,
        sigmas: torch.Tensor,
        prompts: PromptEmbeds,
        transformer: torch.nn.Module | None = None,
    ) -> torch.Tensor:
        """Velocity at packed `latents` (B, S, 4 C) and `sigmas` (B,): float32 (B, S, 4 C).

        The transformer scales `timestep` and `guidance` by 1000 itself, so it gets `sigma` directly
        (the pipeline passes its 0..1000 timesteps divided by 1000).
        """
        if transformer is None:
            transformer = self.inference_forward or self.transformer
        batch, device = latents.shape[0], latents.device
        side = self._grid_side(latents)
        image_ids = self.pipeline._prepare_latent_image_ids(batch, side, side, device, self.dtype)
        return transformer(
            hidden_states=latents.to(self.dtype),
            timestep=sigmas.to(device=device, dtype=torch.float32),
            guidance=self.guidance(batch, device),
            pooled_projections=prompts["pooled"],
            encoder_hidden_states=prompts["prompt_embeds"],
            txt_ids=prompts["text_ids"][0],
            img_ids=image_ids,
            return_dict=False,
        )[0].float()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Unpack (B, S, 4 C) to (B, C, h, w), undo the latent normalisation, decode to (B, 3, H, W) in [0, 1]."""
        factor = self.pipeline.vae_scale_factor
        pixels = self._grid_side(latents) * 2 * factor
        return self._decode_scaled(self.pipeline._unpack_latents(latents, pixels, pixels, factor))
