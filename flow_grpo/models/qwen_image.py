"""Qwen-Image adapter (20 B MMDiT): Qwen2.5-VL text encoder, 2x2-packed latents, true CFG with norm rescaling.

Latents handed in and out are the pipeline's packed layout, float32 (B, S, 4 C) for an H x H image,
`S = (H / (2 f))^2` tokens and VAE factor `f`; the pipeline takes this layout as `latents=` itself.
The transformer takes `sigma` as its timestep (it scales by 1000 itself) and predicts the
flow-matching velocity, so no time conversion is needed. `QwenImagePipeline` runs true CFG as a
second transformer pass against a negative prompt and rescales the guided velocity to the norm of
the conditional one per token (`v = g * |v_c| / |g|`, `g = v_u + w (v_c - v_u)`, norms over the packed
channels); the adapter runs both passes as rows of one call and rescales the same way.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import numpy as np
import torch
from diffusers import QwenImagePipeline
from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift, retrieve_timesteps

from flow_grpo.models.base import JOINT_ATTENTION_LORA_TARGETS, ModelAdapter, PromptEmbeds
from flow_grpo.models.registry import register_adapter

@register_adapter("qwen_image")
class QwenImageAdapter(ModelAdapter):
    """Qwen-Image. PromptEmbeds tensors: `prompt_embeds` (B, L, D), the text encoder's last hidden states
    padded to `max_sequence_length`, and `prompt_mask` (B, L) bool, the tokens the pipeline keeps; without
    `prompt_mask` every token is kept."""

    pipeline_class = QwenImagePipeline
    # Both streams' attention projections and MLPs of the 60 double-stream blocks, the target list of
    # verl's Flow-GRPO Qwen-Image LoRA run (examples/flowgrpo_trainer/run_flowgrpo.sh).
    lora_target_modules = JOINT_ATTENTION_LORA_TARGETS + [
        "img_mlp.net.0.proj",
        "img_mlp.net.2",
        "txt_mlp.net.0.proj",
        "txt_mlp.net.2",
    ]

    pipeline: QwenImagePipeline
    # The negative prompt of true CFG: `QwenImagePipeline`'s documentation enables CFG with `" "`
    # (its model card's default).
    negative_prompt_text = " "

    @classmethod
    def token_patch(cls, transformer_config: dict) -> int:
        return 2  # latents are packed 2x2 into tokens

    @classmethod
    def vae_factor(cls, vae_config: dict) -> int:
        """Each of the causal-3D VAE's down-sampling stages halves the image side (as the pipeline's `vae_scale_factor`)."""
        return 2 ** len(vae_config["temperal_downsample"])

    @property
    def uses_cfg(self) -> bool:
        """The pipeline's rule: true CFG for `true_cfg_scale > 1` with a negative prompt."""
        return self.guidance_scale > 1.0

    @classmethod
    def pipeline_guidance(cls, guidance_scale: float) -> dict[str, Any]:
        """`true_cfg_scale` and, where it guides, the negative prompt (the pipeline's `guidance_scale` is for distilled models)."""
        if guidance_scale > 1.0:
            return {"true_cfg_scale": guidance_scale, "negative_prompt": cls.negative_prompt_text}
        return {"true_cfg_scale": 1.0}

    def prompt_shapes(self, text_tokens: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """`prompt_embeds` (L, joint_attention_dim); without `prompt_mask` every token is kept."""
        return {"prompt_embeds": ((text_tokens, self.transformer.config.joint_attention_dim), self.dtype)}

    @torch.no_grad()
    def _encode(self, prompts: list[str]) -> PromptEmbeds:
        """The pipeline's features and mask, padded from the batch's longest prompt to `max_sequence_length`."""
        self.text_encoders_to_device()
        embeds, mask = self.pipeline.encode_prompt(
            prompt=list(prompts), device=self.device, max_sequence_length=self.max_sequence_length
        )
        batch, length = embeds.shape[:2]
        padded = torch.zeros(batch, self.max_sequence_length, embeds.shape[-1], device=self.device, dtype=self.dtype)
        padded[:, :length] = embeds.to(self.dtype)
        keep = torch.zeros(batch, self.max_sequence_length, device=self.device, dtype=torch.bool)
        keep[:, :length] = True if mask is None else mask.to(device=self.device, dtype=torch.bool)
        return PromptEmbeds({"prompt_embeds": padded, "prompt_mask": keep})

    def initial_latents(
        self, batch_size: int, resolution: int, generator: torch.Generator | list[torch.Generator] | None
    ) -> torch.Tensor:
        """Packed initial noise float32 (B, S, 4 C), drawn as the pipeline draws it (unpacked, then packed)."""
        return self.pipeline.prepare_latents(
            batch_size, self.transformer.config.in_channels // 4, resolution, resolution, torch.float32, self.device,
            generator,
        )

    def sigmas(self, num_steps: int, resolution: int) -> torch.Tensor:
        """QwenImagePipeline's grid: linear sigmas `1 ... 1/N`, shifted by `mu(S)` (and the terminal shift), then 0."""
        scheduler = copy.deepcopy(self.pipeline.scheduler)
        config = scheduler.config
        side = resolution // (self.pipeline.vae_scale_factor * 2)
        mu = calculate_shift(
            side * side,
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.15),
        )
        retrieve_timesteps(scheduler, num_steps, "cpu", sigmas=np.linspace(1.0, 1 / num_steps, num_steps), mu=mu)
        return scheduler.sigmas.to(torch.float32).cpu()

    @staticmethod
    def _mask(prompts: PromptEmbeds) -> torch.Tensor:
        """`prompt_mask` (B, L), or all True where the prompts carry none."""
        mask = prompts.tensors.get("prompt_mask")
        if mask is None:
            embeds = prompts["prompt_embeds"]
            mask = torch.ones(embeds.shape[:2], dtype=torch.bool, device=embeds.device)
        return mask

    @staticmethod
    def _grid_side(latents: torch.Tensor) -> int:
        tokens = latents.shape[1]
        side = math.isqrt(tokens)
        if side * side != tokens:
            raise ValueError(f"packed latents with {tokens} tokens are not a square grid")
        return side

    def velocity(
        self,
        latents: torch.Tensor,
        sigmas: torch.Tensor,
        prompts: PromptEmbeds,
        transformer: torch.nn.Module | None = None,
    ) -> torch.Tensor:
        """Velocity at packed `latents` (B, S, 4 C) and `sigmas` (B,): float32 (B, S, 4 C).

        With CFG the call holds 2 B rows, conditional first; the guided velocity is rescaled per token
        to the conditional one's norm, as the pipeline does.
        """
        transformer = transformer or self.inference_forward or self.transformer
        batch = latents.shape[0]
        hidden = latents.to(self.dtype)
        timestep = sigmas.to(device=latents.device, dtype=torch.float32)
        embeds, mask = prompts["prompt_embeds"], self._mask(prompts)
        if self.uses_cfg:
            negative = self.negative_prompt()
            embeds = torch.cat([embeds, negative["prompt_embeds"].expand(batch, -1, -1)])
            mask = torch.cat([mask, self._mask(negative).expand(batch, -1)])
            hidden, timestep = torch.cat([hidden, hidden]), torch.cat([timestep, timestep])
        side = self._grid_side(latents)
        prediction = transformer(
            hidden_states=hidden,
            timestep=timestep,
            encoder_hidden_states=embeds,
            encoder_hidden_states_mask=mask,
            img_shapes=[[(1, side, side)]] * hidden.shape[0],
            return_dict=False,
        )[0].float()
        if not self.uses_cfg:
            return prediction
        conditional, unconditional = prediction[:batch], prediction[batch:]
        guided = unconditional + self.guidance_scale * (conditional - unconditional)
        return guided * (conditional.norm(dim=-1, keepdim=True) / guided.norm(dim=-1, keepdim=True))

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Unpack, undo the per-channel latent normalisation and decode the single frame to (B, 3, H, W) in [0, 1]."""
        pipeline, vae = self.pipeline, self.pipeline.vae
        resolution = self._grid_side(latents) * 2 * pipeline.vae_scale_factor
        unpacked = pipeline._unpack_latents(latents.to(vae.dtype), resolution, resolution, pipeline.vae_scale_factor)
        shape = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean).view(shape).to(unpacked)
        std = torch.tensor(vae.config.latents_std).view(shape).to(unpacked)
        images = vae.decode(unpacked * std + mean, return_dict=False)[0][:, :, 0]
        return pipeline.image_processor.postprocess(images, output_type="pt").float()
