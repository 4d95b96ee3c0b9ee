"""Architectures of the Qwen-conditioned models: Qwen-Image and the Qwen text encoders, from their config.json files.

The Qwen-Image transformer, VAE and scheduler (Qwen/Qwen-Image), and the text encoders the memory
preflight counts: Qwen3-4B (FLUX.2-klein-4B, Z-Image), Qwen3-8B (FLUX.2-klein-9B) and Qwen2.5-VL-7B
(Qwen-Image). `RandomTextQwenImageAdapter` stands in for the text encoder with random features.
Nothing here downloads anything.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import QwenImagePipeline

from flow_grpo.models import PromptEmbeds, QwenImageAdapter

__all__ = [
    "QWEN25_VL_7B",
    "QWEN3_4B",
    "QWEN3_8B",
    "QWEN_IMAGE_SCHEDULER",
    "QWEN_IMAGE_TRANSFORMER",
    "QWEN_IMAGE_VAE",
    "RandomTextQwenImageAdapter",
]

QWEN_IMAGE_TRANSFORMER: dict[str, Any] = {
    "patch_size": 2,
    "in_channels": 64,  # 16 latent channels packed 2x2
    "out_channels": 16,
    "num_layers": 60,
    "attention_head_dim": 128,
    "num_attention_heads": 24,  # hidden size 3072
    "joint_attention_dim": 3584,  # Qwen2.5-VL-7B hidden size
    "guidance_embeds": False,
    "axes_dims_rope": (16, 56, 56),
}
"""`QwenImageTransformer2DModel` of Qwen/Qwen-Image (60 double-stream blocks, 20.4 B parameters)."""

QWEN_IMAGE_VAE: dict[str, Any] = {
    "base_dim": 96,
    "z_dim": 16,
    "dim_mult": [1, 2, 4, 4],
    "num_res_blocks": 2,
    "attn_scales": [],
    "temperal_downsample": [False, True, True],
    "dropout": 0.0,
    "latents_mean": [
        -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
        0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
    ],
    "latents_std": [
        2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
        3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.916,
    ],
}
"""`AutoencoderKLQwenImage` of Qwen-Image (lists, as the class concatenates them) (the Wan 2.1 causal-3D VAE, factor 8, 16 latent channels)."""

QWEN_IMAGE_SCHEDULER: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 0.9,
    "base_image_seq_len": 256,
    "max_image_seq_len": 8192,
    "shift_terminal": 0.02,
    "time_shift_type": "exponential",
}
"""`FlowMatchEulerDiscreteScheduler` of Qwen-Image."""

QWEN3_4B: dict[str, Any] = {
    "vocab_size": 151936,
    "hidden_size": 2560,
    "intermediate_size": 9728,
    "num_hidden_layers": 36,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "tie_word_embeddings": True,
}
"""Qwen/Qwen3-4B (the text encoder of FLUX.2-klein-4B and Z-Image; 4.0 B parameters)."""

QWEN3_8B: dict[str, Any] = {
    "vocab_size": 151936,
    "hidden_size": 4096,
    "intermediate_size": 12288,
    "num_hidden_layers": 36,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "tie_word_embeddings": False,
}
"""Qwen/Qwen3-8B (the text encoder of FLUX.2-klein-9B; 8.2 B parameters)."""

QWEN25_VL_7B: dict[str, Any] = {
    "text_config": {
        "vocab_size": 152064,
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
        "tie_word_embeddings": False,
    },
    "vision_config": {
        "depth": 32,
        "hidden_size": 1280,
        "intermediate_size": 3420,
        "num_heads": 16,
        "out_hidden_size": 3584,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "window_size": 112,
        "fullatt_block_indexes": [7, 15, 23, 31],
    },
}
"""Qwen/Qwen2.5-VL-7B-Instruct (Qwen-Image's text encoder, vision tower included; 8.3 B parameters)."""


class RandomTextQwenImageAdapter(QwenImageAdapter):
    """Qwen-Image adapter whose prompt features are random (B, text_tokens, joint_attention_dim), every token kept.

    The negative prompt is one random row of the same length.
    """

    def __init__(self, pipeline: QwenImagePipeline, *, guidance_scale: float, text_tokens: int, seed: int = 0) -> None:
        super().__init__(pipeline, guidance_scale=guidance_scale, max_sequence_length=text_tokens)
        self.text_tokens = text_tokens
        self.seed = seed

    def _encode(self, prompts: list[str]) -> PromptEmbeds:
        generator = torch.Generator().manual_seed(self.seed if list(prompts) == [""] else self.seed + 1)
        shape = (len(prompts), self.text_tokens, self.transformer.config.joint_attention_dim)
        embeds = torch.randn(shape, generator=generator).to(device=self.device, dtype=self.dtype)
        return PromptEmbeds({"prompt_embeds": embeds})
