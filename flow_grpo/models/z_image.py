"""Z-Image adapter (Z-Image and the distilled Z-Image-Turbo): Qwen3 text encoder, per-sample lists, reversed time.

Latents handed in and out are the pipeline's layout, float32 (B, C, h, w). The transformer differs
from the flow-matching convention the sampler and the SDE / CPS steps assume in three ways, all
converted in `velocity`: it takes a list of per-sample latents (C, 1, h, w) and a list of per-sample
caption features of their own lengths; its time runs the other way, `t = (1000 - timestep) / 1000 =
1 - sigma`; and it predicts the negated velocity (the pipeline steps with `-output`).
Its CFG is `v_c + w (v_c - v_u)` (on for any `w > 0`; Z-Image-Turbo runs at `w = 0`).
"""

from __future__ import annotations

import copy

import torch
from diffusers import ZImagePipeline
from diffusers.pipelines.z_image.pipeline_z_image import calculate_shift, get_default_z_image_sigmas, retrieve_timesteps

from flow_grpo.models.base import ModelAdapter, PromptEmbeds
from flow_grpo.models.registry import register_adapter


@register_adapter("z_image")
class ZImageAdapter(ModelAdapter):
    """Z-Image. PromptEmbeds tensors: `prompt_embeds` (B, L, D), the Qwen3 hidden states padded to
    `max_sequence_length`, and `prompt_mask` (B, L) bool, the tokens the pipeline keeps per prompt."""

    pipeline_class = ZImagePipeline
    # Attention projections and the SwiGLU feed-forward (w1, w2, w3) of the main blocks and of both
    # refiners (noise and caption), as Flow-Factory's Z-Image LoRA trains the transformer's layers.
    lora_target_modules = [
        "attention.to_q",
        "attention.to_k",
        "attention.to_v",
        "attention.to_out.0",
        "feed_forward.w1",
        "feed_forward.w2",
        "feed_forward.w3",
    ]

    pipeline: ZImagePipeline

    @property
    def uses_cfg(self) -> bool:
        """The pipeline's rule: CFG for any positive guidance scale."""
        return self.guidance_scale > 0.0

    @torch.no_grad()
    def _encode(self, prompts: list[str]) -> PromptEmbeds:
        """The pipeline's per-prompt features, padded back to (B, L, D) with their mask (B, L)."""
        self.text_encoders_to_device()
        features, _ = self.pipeline.encode_prompt(
            prompt=list(prompts), device=self.device, do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length,
        )
        length = self.max_sequence_length
        embeds = torch.zeros(len(features), length, features[0].shape[-1], device=self.device, dtype=self.dtype)
        mask = torch.zeros(len(features), length, device=self.device, dtype=torch.bool)
        for row, feature in enumerate(features):
            embeds[row, : feature.shape[0]] = feature.to(self.dtype)
            mask[row, : feature.shape[0]] = True
        return PromptEmbeds({"prompt_embeds": embeds, "prompt_mask": mask})

    def prompt_shapes(self, text_tokens: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """`prompt_embeds` (L, cap_feat_dim); without `prompt_mask` every token is a caption token."""
        return {"prompt_embeds": ((text_tokens, self.transformer.config.cap_feat_dim), self.dtype)}

    def initial_latents(
        self, batch_size: int, resolution: int, generator: torch.Generator | list[torch.Generator] | None
    ) -> torch.Tensor:
        """Initial noise float32 (B, C, h, w), drawn as the pipeline draws it."""
        return self.pipeline.prepare_latents(
            batch_size, self.transformer.in_channels, resolution, resolution, torch.float32, self.device, generator
        )

    def sigmas(self, num_steps: int, resolution: int) -> torch.Tensor:
        """ZImagePipeline's grid: linear sigmas `1 ... 1/N` through the scheduler's shift, then 0."""
        scheduler = copy.deepcopy(self.pipeline.scheduler)
        config = scheduler.config
        side = 2 * (resolution // (self.pipeline.vae_scale_factor * 2))
        mu = calculate_shift(
            (side // 2) ** 2,
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.15),
        )
        retrieve_timesteps(scheduler, num_steps, "cpu", sigmas=get_default_z_image_sigmas(num_steps), mu=mu)
        return scheduler.sigmas.to(torch.float32).cpu()

    @staticmethod
    def _captions(prompts: PromptEmbeds) -> list[torch.Tensor]:
        """The per-sample caption features (L_i, D) the transformer takes (all L rows where there is no mask)."""
        if "prompt_mask" not in prompts.tensors:
            return list(prompts["prompt_embeds"].unbind(0))
        return [embeds[mask] for embeds, mask in zip(prompts["prompt_embeds"], prompts["prompt_mask"])]

    def velocity(
        self,
        latents: torch.Tensor,
        sigmas: torch.Tensor,
        prompts: PromptEmbeds,
        transformer: torch.nn.Module | None = None,
    ) -> torch.Tensor:
        """Flow-matching velocity at `latents` (B, C, h, w) and `sigmas` (B,): float32 (B, C, h, w).

        One transformer call on the list of B samples (2 B with CFG, conditional rows first as the
        pipeline orders them) at model time `1 - sigma`; the output is negated.
        """
        transformer = transformer or self.inference_forward or self.transformer
        batch = latents.shape[0]
        samples = list(latents.to(self.dtype).unsqueeze(2).unbind(0))
        time = 1.0 - sigmas.to(device=latents.device, dtype=torch.float32)
        captions = self._captions(prompts)
        if self.uses_cfg:
            samples = samples + samples
            time = torch.cat([time, time])
            captions = captions + self._captions(self.negative_prompt()) * batch
        outputs = transformer(x=samples, t=time, cap_feats=captions, return_dict=False)[0]  # keywords: compiled phases take no positions
        prediction = -torch.stack([output.float() for output in outputs]).squeeze(2)
        if not self.uses_cfg:
            return prediction
        conditional, unconditional = prediction[:batch], prediction[batch:]
        return conditional + self.guidance_scale * (conditional - unconditional)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Undo the latent normalisation and decode (B, C, h, w) to (B, 3, H, W) in [0, 1]."""
        return self._decode_scaled(latents)
