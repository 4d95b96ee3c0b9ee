"""Stable Diffusion 3 / 3.5 adapter: three text encoders, classifier-free guidance, patchified latents."""

from __future__ import annotations

import copy

import torch
from diffusers import StableDiffusion3Pipeline
from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift, retrieve_timesteps

from flow_grpo.models.base import JOINT_ATTENTION_LORA_TARGETS, ModelAdapter, PromptEmbeds
from flow_grpo.models.registry import register_adapter

SD3_CLIP_TOKENS = 77
"""Tokens of the SD3 CLIP text encoders; the T5 tokens follow them in `prompt_embeds`."""


@register_adapter("sd3")
class SD3Adapter(ModelAdapter):
    """SD3 with CFG `v = v_u + w (v_c - v_u)` against the empty prompt, in one batched call."""

    pipeline_class = StableDiffusion3Pipeline
    lora_target_modules = JOINT_ATTENTION_LORA_TARGETS

    @property
    def uses_cfg(self) -> bool:
        return self.guidance_scale > 1.0

    @classmethod
    def prompt_tokens(cls, max_sequence_length: int) -> int:
        """77 CLIP tokens, then the T5 tokens."""
        return SD3_CLIP_TOKENS + max_sequence_length

    def prompt_shapes(self, text_tokens: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """`prompt_embeds` (L, joint_attention_dim) and `pooled` (pooled_projection_dim,)."""
        config = self.transformer.config
        return {
            "prompt_embeds": ((text_tokens, config.joint_attention_dim), self.dtype),
            "pooled": ((config.pooled_projection_dim,), self.dtype),
        }

    @torch.no_grad()
    def _encode(self, prompts: list[str]) -> PromptEmbeds:
        self.text_encoders_to_device()
        embeds, _, pooled, _ = self.pipeline.encode_prompt(
            prompt=prompts,
            prompt_2=None,
            prompt_3=None,
            device=self.device,
            do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length,
        )
        return PromptEmbeds({"prompt_embeds": embeds.to(self.dtype), "pooled": pooled.to(self.dtype)})

    def initial_latents(
        self, batch_size: int, resolution: int, generator: torch.Generator | list[torch.Generator] | None
    ) -> torch.Tensor:
        return self.pipeline.prepare_latents(
            batch_size,
            self.transformer.config.in_channels,
            resolution,
            resolution,
            torch.float32,
            self.device,
            generator,
        )

    def sigmas(self, num_steps: int, resolution: int) -> torch.Tensor:
        scheduler = copy.deepcopy(self.pipeline.scheduler)
        kwargs = {}
        if scheduler.config.get("use_dynamic_shifting", False):
            latent_size = resolution // self.pipeline.vae_scale_factor // self.transformer.config.patch_size
            kwargs["mu"] = calculate_shift(
                latent_size * latent_size,
                scheduler.config.get("base_image_seq_len", 256),
                scheduler.config.get("max_image_seq_len", 4096),
                scheduler.config.get("base_shift", 0.5),
                scheduler.config.get("max_shift", 1.16),
            )
        retrieve_timesteps(scheduler, num_steps, "cpu", **kwargs)
        return scheduler.sigmas.to(torch.float32).cpu()

    def velocity(
        self,
        latents: torch.Tensor,
        sigmas: torch.Tensor,
        prompts: PromptEmbeds,
        transformer: torch.nn.Module | None = None,
    ) -> torch.Tensor:
        transformer = transformer or self.inference_forward or self.transformer
        batch = latents.shape[0]
        hidden = latents.to(self.dtype)
        timestep = sigmas.to(device=latents.device, dtype=torch.float32) * self.pipeline.scheduler.config.num_train_timesteps
        embeds, pooled = prompts["prompt_embeds"], prompts["pooled"]
        if self.uses_cfg:
            negative = self.negative_prompt()
            embeds = torch.cat([negative["prompt_embeds"].expand(batch, -1, -1), embeds])
            pooled = torch.cat([negative["pooled"].expand(batch, -1), pooled])
            hidden = torch.cat([hidden, hidden])
            timestep = torch.cat([timestep, timestep])
        prediction = transformer(
            hidden_states=hidden,
            timestep=timestep,
            encoder_hidden_states=embeds,
            pooled_projections=pooled,
            return_dict=False,
        )[0].float()
        if not self.uses_cfg:
            return prediction
        unconditional, conditional = prediction.chunk(2)
        return unconditional + self.guidance_scale * (conditional - unconditional)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self._decode_scaled(latents)
