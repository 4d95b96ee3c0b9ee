"""Architectures of the real models (component configs, random weights) and adapters with random prompt embeddings.

The configs are those of the published checkpoints' config.json files: the SD3.5-Medium, SD3.5-Large,
FLUX.1-dev, FLUX.2-klein-4B and Z-Image transformers and VAEs, their text encoders (CLIP-L, OpenCLIP bigG, T5-XXL) and the
CLIP ViT-H/14 and ViT-L/14 reward models. `model_spec(size)` gives them,
or the tiny models of `flow_grpo.testing.pipelines` for CPU runs. The random-text adapters stand
in for the text encoders: prompt embeddings are random tensors of the shapes the real encoders give.
Nothing here downloads anything.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import Flux2KleinPipeline, FluxPipeline, StableDiffusion3Pipeline, ZImagePipeline

from flow_grpo.models import Flux2KleinAdapter, FluxAdapter, PromptEmbeds, SD3Adapter, ZImageAdapter
from flow_grpo.testing.architectures_qwen import QWEN_IMAGE_SCHEDULER, QWEN_IMAGE_TRANSFORMER, QWEN_IMAGE_VAE
from flow_grpo.testing.pipelines import BUILDERS, CLIP_MAX_LENGTH, T5_MAX_LENGTH

__all__ = [
    "CLIP_L_TEXT",
    "CLIP_VIT_H_14",
    "CLIP_VIT_L_14",
    "FLUX2_KLEIN_4B_TRANSFORMER",
    "FLUX2_SCHEDULER",
    "FLUX2_VAE",
    "FLUX_DEV_TRANSFORMER",
    "FLUX_SCHEDULER",
    "FLUX_VAE",
    "OPENCLIP_BIGG_TEXT",
    "SD35_LARGE_TRANSFORMER",
    "SD35_MEDIUM_TRANSFORMER",
    "SD3_CLIP_TOKENS",
    "SD3_SCHEDULER",
    "SD3_VAE",
    "SIZES",
    "T5_XXL_ENCODER",
    "ModelSpec",
    "RandomTextFlux2KleinAdapter",
    "RandomTextFluxAdapter",
    "RandomTextSD3Adapter",
    "RandomTextZImageAdapter",
    "Z_IMAGE_SCHEDULER",
    "Z_IMAGE_TRANSFORMER",
    "model_spec",
]

# Component configs of the published checkpoints (their config.json files), random weights.

SD35_MEDIUM_TRANSFORMER: dict[str, Any] = {
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 16,
    "out_channels": 16,
    "num_layers": 24,
    "attention_head_dim": 64,
    "num_attention_heads": 24,  # hidden size 24 x 64 = 1536
    "joint_attention_dim": 4096,
    "caption_projection_dim": 1536,
    "pooled_projection_dim": 2048,
    "pos_embed_max_size": 384,
    "dual_attention_layers": tuple(range(13)),  # MMDiT-X: a second image self-attention in layers 0-12
    "qk_norm": "rms_norm",
}
"""`SD3Transformer2DModel` of stabilityai/stable-diffusion-3.5-medium (2.24 B parameters)."""

SD35_LARGE_TRANSFORMER: dict[str, Any] = {
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 16,
    "out_channels": 16,
    "num_layers": 38,
    "attention_head_dim": 64,
    "num_attention_heads": 38,  # hidden size 38 x 64 = 2432
    "joint_attention_dim": 4096,
    "caption_projection_dim": 2432,
    "pooled_projection_dim": 2048,
    "pos_embed_max_size": 192,
    "qk_norm": "rms_norm",  # no dual-attention layers (MMDiT, not MMDiT-X)
}
"""`SD3Transformer2DModel` of stabilityai/stable-diffusion-3.5-large (8.06 B parameters); same VAE,
text encoders and scheduler as Medium."""

SD3_VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 16,
    "norm_num_groups": 32,
    "sample_size": 1024,
    "scaling_factor": 1.5305,
    "shift_factor": 0.0609,
    "force_upcast": True,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
}
"""`AutoencoderKL` of SD3 / SD3.5 (16 latent channels, down-sampling factor 8)."""

FLUX_VAE: dict[str, Any] = {**SD3_VAE, "scaling_factor": 0.3611, "shift_factor": 0.1159}
"""`AutoencoderKL` of FLUX.1-dev: the SD3 architecture with FLUX's latent normalisation."""

SD3_SCHEDULER: dict[str, Any] = {"num_train_timesteps": 1000, "shift": 3.0}
"""`FlowMatchEulerDiscreteScheduler` of SD3.5."""

FLUX_DEV_TRANSFORMER: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": 64,  # 16 latent channels packed 2x2
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,  # hidden size 24 x 128 = 3072
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "guidance_embeds": True,
    "axes_dims_rope": (16, 56, 56),
}
"""`FluxTransformer2DModel` of black-forest-labs/FLUX.1-dev (11.9 B parameters)."""

FLUX_SCHEDULER: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}
"""`FlowMatchEulerDiscreteScheduler` of FLUX.1-dev (resolution-dependent shift)."""

CLIP_VIT_H_14: dict[str, Any] = {
    "text_config": {
        "vocab_size": 49408,
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "max_position_embeddings": 77,
        "hidden_act": "gelu",
        # The in-memory tokenizer of `tiny_clip_processor` marks the end of text with id 1.
        "bos_token_id": 0,
        "eos_token_id": 1,
        "pad_token_id": 1,
    },
    "vision_config": {
        "hidden_size": 1280,
        "intermediate_size": 5120,
        "num_hidden_layers": 32,
        "num_attention_heads": 16,
        "image_size": 224,
        "patch_size": 14,
        "hidden_act": "gelu",
    },
    "projection_dim": 1024,
}
"""`CLIPModel` of laion/CLIP-ViT-H-14 (PickScore's architecture, 0.99 B parameters)."""

SD3_CLIP_TOKENS = 77
"""Tokens of the SD3 CLIP text encoders; the T5 tokens follow them in `prompt_embeds`."""

CLIP_L_TEXT: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "projection_dim": 768,
    "hidden_act": "quick_gelu",
}
"""Text tower of openai/clip-vit-large-patch14 (SD3 `text_encoder`, FLUX `text_encoder`)."""

OPENCLIP_BIGG_TEXT: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "max_position_embeddings": 77,
    "projection_dim": 1280,
    "hidden_act": "gelu",
}
"""Text tower of OpenCLIP ViT-bigG/14 (SD3 `text_encoder_2`)."""

T5_XXL_ENCODER: dict[str, Any] = {
    "vocab_size": 32128,
    "d_model": 4096,
    "d_kv": 64,
    "d_ff": 10240,
    "num_layers": 24,
    "num_heads": 64,
    "feed_forward_proj": "gated-gelu",
    "relative_attention_num_buckets": 32,
}
"""Encoder of google/t5-v1_1-xxl (SD3 `text_encoder_3`, FLUX `text_encoder_2`; 4.76 B parameters)."""

CLIP_VIT_L_14: dict[str, Any] = {
    "text_config": {key: CLIP_L_TEXT[key] for key in CLIP_L_TEXT if key != "projection_dim"},
    "vision_config": {
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "image_size": 224,
        "patch_size": 14,
        "hidden_act": "quick_gelu",
    },
    "projection_dim": 768,
}
"""`CLIPModel` of openai/clip-vit-large-patch14 (CLIPScore and the aesthetic backbone)."""


@dataclass(frozen=True)
class ModelSpec:
    """Architecture of one benchmarked model family: component configs, no weights.

    Attributes:
        name: label in reports.
        family: the adapter family, "sd3" or "flux".
        transformer, vae, scheduler: diffusers configs (`from_config` keyword arguments).
        text_tokens: tokens of the prompt embeddings the text encoders give (SD3: 77 CLIP + T5).
        reward: `CLIPConfig` keyword arguments of the reward model.
        reward_image_size: the reward processor's resize and crop size in pixels.
    """

    name: str
    family: str
    transformer: Mapping[str, Any]
    vae: Mapping[str, Any]
    scheduler: Mapping[str, Any]
    text_tokens: int
    reward: Mapping[str, Any]
    reward_image_size: int


FLUX2_KLEIN_4B_TRANSFORMER: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": 128,  # 32 latent channels patchified 2x2
    "num_layers": 5,
    "num_single_layers": 20,
    "attention_head_dim": 128,
    "num_attention_heads": 24,  # hidden size 3072
    "joint_attention_dim": 7680,  # 3 Qwen3-4B layers of 2560
    "timestep_guidance_channels": 256,
    "mlp_ratio": 3.0,
    "axes_dims_rope": (32, 32, 32, 32),
    "rope_theta": 2000,
    "guidance_embeds": False,
}
"""`Flux2Transformer2DModel` of black-forest-labs/FLUX.2-klein-4B (and its base variant; about 3.9 B parameters)."""

FLUX2_VAE: dict[str, Any] = {
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "latent_channels": 32,
    "norm_num_groups": 32,
    "use_quant_conv": True,
    "use_post_quant_conv": True,
    "batch_norm_eps": 1e-4,
    "patch_size": (2, 2),
}
"""`AutoencoderKLFlux2` of FLUX.2 (32 latent channels, factor 8, BatchNorm statistics of the 2x2-patchified latents)."""

FLUX2_SCHEDULER: dict[str, Any] = {**FLUX_SCHEDULER, "time_shift_type": "exponential"}
"""`FlowMatchEulerDiscreteScheduler` of FLUX.2 (`mu` from `compute_empirical_mu`)."""

Z_IMAGE_TRANSFORMER: dict[str, Any] = {
    "all_patch_size": (2,),
    "all_f_patch_size": (1,),
    "in_channels": 16,
    "dim": 3840,
    "n_layers": 30,
    "n_refiner_layers": 2,
    "n_heads": 30,
    "n_kv_heads": 30,
    "norm_eps": 1e-5,
    "qk_norm": True,
    "cap_feat_dim": 2560,  # Qwen3-4B hidden size
    "rope_theta": 256.0,
    "t_scale": 1000.0,
    "axes_dims": [32, 48, 48],
    "axes_lens": [1536, 512, 512],
}
"""`ZImageTransformer2DModel` of Tongyi-MAI/Z-Image and Z-Image-Turbo (6.2 B parameters); the VAE is FLUX.1's."""

Z_IMAGE_SCHEDULER: dict[str, Any] = {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": False}
"""`FlowMatchEulerDiscreteScheduler` of Z-Image."""

SIZES: tuple[str, ...] = ("tiny", "tiny_flux", "sd3", "sd3_large", "flux", "flux2_klein", "z_image", "qwen_image")
"""Model sizes `--size` accepts: the tiny test models (CPU) and the real ones (GPU)."""


def _tiny_spec(family: str) -> ModelSpec:
    """The tiny pipeline of `flow_grpo.testing` (real latent geometry) and the tiny CLIP of `testing.rewards`."""
    from flow_grpo.testing.rewards import tiny_clip_model

    pipeline = BUILDERS[family]("real")
    clip = tiny_clip_model().config
    return ModelSpec(
        name=f"tiny-{family}",
        family=family,
        transformer=dict(pipeline.transformer.config),
        vae=dict(pipeline.vae.config),
        scheduler=dict(pipeline.scheduler.config),
        text_tokens=CLIP_MAX_LENGTH + T5_MAX_LENGTH if family == "sd3" else T5_MAX_LENGTH,
        reward={
            "text_config": clip.text_config.to_dict(),
            "vision_config": clip.vision_config.to_dict(),
            "projection_dim": clip.projection_dim,
        },
        reward_image_size=clip.vision_config.image_size,
    )


def model_spec(size: str) -> ModelSpec:
    """The architecture benchmarked at `size` (one of `SIZES`)."""
    if size == "tiny":
        return _tiny_spec("sd3")
    if size == "tiny_flux":
        return _tiny_spec("flux")
    if size == "sd3":
        return ModelSpec(
            name="SD3.5-Medium",
            family="sd3",
            transformer=SD35_MEDIUM_TRANSFORMER,
            vae=SD3_VAE,
            scheduler=SD3_SCHEDULER,
            text_tokens=SD3_CLIP_TOKENS + 128,  # max_sequence_length 128 of the SD3 presets
            reward=CLIP_VIT_H_14,
            reward_image_size=224,
        )
    if size == "sd3_large":
        return ModelSpec(
            name="SD3.5-Large",
            family="sd3",
            transformer=SD35_LARGE_TRANSFORMER,
            vae=SD3_VAE,
            scheduler=SD3_SCHEDULER,
            text_tokens=SD3_CLIP_TOKENS + 128,
            reward=CLIP_VIT_H_14,
            reward_image_size=224,
        )
    if size == "flux":
        return ModelSpec(
            name="FLUX.1-dev",
            family="flux",
            transformer=FLUX_DEV_TRANSFORMER,
            vae=FLUX_VAE,
            scheduler=FLUX_SCHEDULER,
            text_tokens=512,  # max_sequence_length 512 of the FLUX presets
            reward=CLIP_VIT_H_14,
            reward_image_size=224,
        )
    if size == "flux2_klein":
        return ModelSpec(
            name="FLUX.2-klein-4B", family="flux2_klein", transformer=FLUX2_KLEIN_4B_TRANSFORMER, vae=FLUX2_VAE,
            scheduler=FLUX2_SCHEDULER, text_tokens=128, reward=CLIP_VIT_H_14, reward_image_size=224,
        )
    if size == "z_image":
        return ModelSpec(
            name="Z-Image", family="z_image", transformer=Z_IMAGE_TRANSFORMER, vae=FLUX_VAE,
            scheduler=Z_IMAGE_SCHEDULER, text_tokens=128, reward=CLIP_VIT_H_14, reward_image_size=224,
        )
    if size == "qwen_image":
        return ModelSpec(
            name="Qwen-Image", family="qwen_image", transformer=QWEN_IMAGE_TRANSFORMER, vae=QWEN_IMAGE_VAE,
            scheduler=QWEN_IMAGE_SCHEDULER, text_tokens=128, reward=CLIP_VIT_H_14, reward_image_size=224,
        )
    raise ValueError(f"unknown size {size!r}; choose one of {SIZES}")


class RandomTextFlux2KleinAdapter(Flux2KleinAdapter):
    """FLUX.2-klein adapter whose prompt embeddings are random: `prompt_embeds` (B, text_tokens,
    joint_attention_dim) and the pipeline's text position ids; the CFG negative prompt is one random row."""

    def __init__(self, pipeline: Flux2KleinPipeline, *, guidance_scale: float, text_tokens: int, seed: int = 0) -> None:
        super().__init__(pipeline, guidance_scale=guidance_scale, max_sequence_length=text_tokens)
        self.text_tokens = text_tokens
        self.seed = seed

    def _encode(self, prompts: list[str]) -> PromptEmbeds:
        shapes = {"prompt_embeds": (self.text_tokens, self.transformer.config.joint_attention_dim)}
        seed = self.seed if list(prompts) == [""] else self.seed + 1
        batch = _random_prompt_batch(shapes, len(prompts), self.device, self.dtype, seed)
        text_ids = self.pipeline._prepare_text_ids(batch["prompt_embeds"]).to(self.device)
        return PromptEmbeds({**batch.tensors, "text_ids": text_ids})


class RandomTextZImageAdapter(ZImageAdapter):
    """Z-Image adapter whose caption features are random (B, text_tokens, cap_feat_dim), all tokens kept."""

    def __init__(self, pipeline: ZImagePipeline, *, guidance_scale: float, text_tokens: int, seed: int = 0) -> None:
        super().__init__(pipeline, guidance_scale=guidance_scale, max_sequence_length=text_tokens)
        self.text_tokens = text_tokens
        self.seed = seed

    def _encode(self, prompts: list[str]) -> PromptEmbeds:
        shapes = {"prompt_embeds": (self.text_tokens, self.transformer.config.cap_feat_dim)}
        seed = self.seed if list(prompts) == [""] else self.seed + 1
        batch = _random_prompt_batch(shapes, len(prompts), self.device, self.dtype, seed)
        mask = torch.ones(len(prompts), self.text_tokens, device=self.device, dtype=torch.bool)
        return PromptEmbeds({**batch.tensors, "prompt_mask": mask})

    @staticmethod
    def _captions(prompts: PromptEmbeds) -> list[torch.Tensor]:
        """Every row whole (the mask is all True): no data-dependent indexing, so it runs on the meta device."""
        return list(prompts["prompt_embeds"].unbind(0))


class RandomTextSD3Adapter(SD3Adapter):
    """SD3 adapter whose prompt embeddings are random tensors of the real encoders' shapes.

    `prompt_embeds` (B, text_tokens, joint_attention_dim) and `pooled` (B, pooled_projection_dim),
    in the transformer's dtype; the CFG negative prompt is one such random row. No text encoder is
    needed, so the pipeline may be built without them.
    """

    def __init__(self, pipeline: StableDiffusion3Pipeline, *, guidance_scale: float, text_tokens: int, seed: int = 0) -> None:
        super().__init__(pipeline, guidance_scale=guidance_scale, max_sequence_length=text_tokens - SD3_CLIP_TOKENS)
        self.text_tokens = text_tokens
        self.seed = seed
        self._random_negative: PromptEmbeds | None = None

    def encode_prompts(self, prompts: list[str]) -> PromptEmbeds:
        config = self.transformer.config
        return _random_prompt_batch(
            {"prompt_embeds": (self.text_tokens, config.joint_attention_dim), "pooled": (config.pooled_projection_dim,)},
            len(prompts),
            self.device,
            self.dtype,
            self.seed + 1,
        )

    def negative_prompt(self) -> PromptEmbeds:
        if self._random_negative is None:
            config = self.transformer.config
            self._random_negative = _random_prompt_batch(
                {"prompt_embeds": (self.text_tokens, config.joint_attention_dim), "pooled": (config.pooled_projection_dim,)},
                1,
                self.device,
                self.dtype,
                self.seed,
            )
        return self._random_negative


class RandomTextFluxAdapter(FluxAdapter):
    """FLUX adapter whose prompt embeddings are random tensors of the real encoders' shapes.

    `prompt_embeds` (B, text_tokens, joint_attention_dim) from "T5", `pooled` (B, pooled_projection_dim)
    from "CLIP" and all-zero `text_ids` (B, text_tokens, 3), as `FluxPipeline.encode_prompt` gives.
    """

    def __init__(self, pipeline: FluxPipeline, *, guidance_scale: float, text_tokens: int, seed: int = 0) -> None:
        super().__init__(pipeline, guidance_scale=guidance_scale, max_sequence_length=text_tokens)
        self.text_tokens = text_tokens
        self.seed = seed

    def encode_prompts(self, prompts: list[str]) -> PromptEmbeds:
        config = self.transformer.config
        batch = _random_prompt_batch(
            {"prompt_embeds": (self.text_tokens, config.joint_attention_dim), "pooled": (config.pooled_projection_dim,)},
            len(prompts),
            self.device,
            self.dtype,
            self.seed + 1,
        )
        text_ids = torch.zeros(len(prompts), self.text_tokens, 3, device=self.device, dtype=self.dtype)
        return PromptEmbeds({**batch.tensors, "text_ids": text_ids})


def _random_prompt_batch(
    shapes: Mapping[str, tuple[int, ...]], batch: int, device: torch.device, dtype: torch.dtype, seed: int
) -> PromptEmbeds:
    """Standard-normal tensors (batch, *shape) per name, drawn on the CPU (any device gets the same values)."""
    generator = torch.Generator().manual_seed(seed)
    return PromptEmbeds(
        {name: torch.randn((batch, *shape), generator=generator).to(device=device, dtype=dtype) for name, shape in shapes.items()}
    )
