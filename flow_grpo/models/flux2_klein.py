"""FLUX.2-klein adapter (4 B and 9 B): Qwen3 text encoder, 2x2-patchified and packed latents, CFG on base variants.

Latents handed in and out are the pipeline's packed layout, float32 (B, S, 4 C): the VAE latents
(C channels, normalised by the VAE's BatchNorm statistics) are patchified 2x2 into 4 C channels and
flattened to `S = (H / (2 f))^2` tokens for an H x H image and VAE factor `f`. Images are square: the
token grid side is recovered from `S`. The distilled variants (`is_distilled` in the pipeline config)
take no guidance; the base variants take true CFG against the empty prompt, which the adapter runs
as extra rows of one transformer call rather than the pipeline's second call.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import torch
from diffusers import Flux2KleinPipeline
from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu, retrieve_timesteps

from flow_grpo.models.base import JOINT_ATTENTION_LORA_TARGETS, ModelAdapter, PromptEmbeds
from flow_grpo.models.registry import register_adapter


@register_adapter("flux2_klein")
class Flux2KleinAdapter(ModelAdapter):
    """FLUX.2-klein. PromptEmbeds tensors: `prompt_embeds` (B, L, 3 D), the Qwen3 hidden states of three
    layers side by side, and `text_ids` (B, L, 4), their position ids."""

    pipeline_class = Flux2KleinPipeline
    # Double-stream blocks: both streams' attention projections and feed-forward layers (FLUX.2 names
    # them `linear_in` / `linear_out`). Single-stream blocks fuse q, k, v and the MLP input into
    # `attn.to_qkv_mlp_proj`; their fused output `attn.to_out` shares its suffix with the double-stream
    # `attn.to_out` ModuleList, which PEFT's suffix matching cannot tell apart, so it is not trained.
    lora_target_modules = JOINT_ATTENTION_LORA_TARGETS + [
        "ff.linear_in",
        "ff.linear_out",
        "ff_context.linear_in",
        "ff_context.linear_out",
        "attn.to_qkv_mlp_proj",
    ]

    pipeline: Flux2KleinPipeline

    @classmethod
    def token_patch(cls, transformer_config: dict) -> int:
        return 2  # latents are patchified 2x2 into tokens

    @property
    def uses_cfg(self) -> bool:
        """CFG on the base variants only; the step-distilled ones ignore the guidance scale, as the pipeline does."""
        return self.guidance_scale > 1.0 and not self.pipeline.config.is_distilled

    def prompt_shapes(self, text_tokens: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """`prompt_embeds` (L, joint_attention_dim) and integer `text_ids` (L, 4)."""
        return {
            "prompt_embeds": ((text_tokens, self.transformer.config.joint_attention_dim), self.dtype),
            "text_ids": ((text_tokens, 4), torch.int64),
        }

    @torch.no_grad()
    def _encode(self, prompts: list[str]) -> PromptEmbeds:
        self.text_encoders_to_device()
        embeds, text_ids = self.pipeline.encode_prompt(
            prompt=list(prompts), device=self.device, max_sequence_length=self.max_sequence_length
        )
        return PromptEmbeds({"prompt_embeds": embeds.to(self.dtype), "text_ids": text_ids.to(self.device)})

    def initial_latents(
        self, batch_size: int, resolution: int, generator: torch.Generator | list[torch.Generator] | None
    ) -> torch.Tensor:
        """Packed initial noise float32 (B, S, 4 C), drawn as the pipeline draws it (patchified shape, then packed)."""
        latents, _ = self.pipeline.prepare_latents(
            batch_size, self.transformer.config.in_channels // 4, resolution, resolution, torch.float32, self.device, generator
        )
        return latents

    def sigmas(self, num_steps: int, resolution: int) -> torch.Tensor:
        """Flux2KleinPipeline's grid: linear sigmas `1 ... 1/N` shifted by the empirical `mu(S, N)`, then 0."""
        scheduler = copy.deepcopy(self.pipeline.scheduler)
        grid = None if scheduler.config.get("use_flow_sigmas", False) else np.linspace(1.0, 1.0 / num_steps, num_steps)
        side = resolution // (self.pipeline.vae_scale_factor * 2)
        mu = compute_empirical_mu(image_seq_len=side * side, num_steps=num_steps)
        retrieve_timesteps(scheduler, num_steps, "cpu", sigmas=grid, mu=mu)
        return scheduler.sigmas.to(torch.float32).cpu()

    def _latent_ids(self, latents: torch.Tensor) -> torch.Tensor:
        """Position ids (B, S, 4) of a square packed grid, from the pipeline's own helper."""
        tokens = latents.shape[1]
        side = math.isqrt(tokens)
        if side * side != tokens:
            raise ValueError(f"packed latents with {tokens} tokens are not a square grid")
        grid = torch.empty(latents.shape[0], 0, side, side, device="meta")
        return self.pipeline._prepare_latent_ids(grid).to(latents.device)

    def pipeline_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """The pipeline's `latents=` layout: unpacked patchified (B, 4 C, h, w)."""
        side = math.isqrt(latents.shape[1])
        return self.pipeline._unpack_latents_with_ids(latents, self._latent_ids(latents), side, side)

    def velocity(
        self,
        latents: torch.Tensor,
        sigmas: torch.Tensor,
        prompts: PromptEmbeds,
        transformer: torch.nn.Module | None = None,
    ) -> torch.Tensor:
        """Velocity at packed `latents` (B, S, 4 C) and `sigmas` (B,): float32 (B, S, 4 C).

        The transformer scales `timestep` by 1000 itself, so it gets `sigma` (the pipeline passes t / 1000).
        """
        transformer = transformer or self.inference_forward or self.transformer
        batch, device = latents.shape[0], latents.device
        hidden = latents.to(self.dtype)
        image_ids = self._latent_ids(latents)
        timestep = sigmas.to(device=device, dtype=torch.float32)
        embeds, text_ids = prompts["prompt_embeds"], prompts["text_ids"]
        if self.uses_cfg:
            negative = self.negative_prompt()
            embeds = torch.cat([negative["prompt_embeds"].expand(batch, -1, -1), embeds])
            text_ids = torch.cat([negative["text_ids"].expand(batch, -1, -1), text_ids])
            hidden, image_ids, timestep = torch.cat([hidden, hidden]), torch.cat([image_ids, image_ids]), torch.cat([timestep, timestep])
        prediction = transformer(
            hidden_states=hidden,
            timestep=timestep,
            guidance=None,
            encoder_hidden_states=embeds,
            txt_ids=text_ids,
            img_ids=image_ids,
            return_dict=False,
        )[0].float()
        if not self.uses_cfg:
            return prediction
        unconditional, conditional = prediction.chunk(2)
        return unconditional + self.guidance_scale * (conditional - unconditional)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Unpack, undo the BatchNorm normalisation, unpatchify, decode to (B, 3, H, W) in [0, 1]."""
        pipeline, vae = self.pipeline, self.pipeline.vae
        unpacked = self.pipeline_latents(latents.to(vae.dtype))
        mean = vae.bn.running_mean.view(1, -1, 1, 1).to(unpacked)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(unpacked)
        images = vae.decode(pipeline._unpatchify_latents(unpacked * std + mean), return_dict=False)[0]
        return pipeline.image_processor.postprocess(images, output_type="pt").float()
