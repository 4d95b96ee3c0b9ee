"""Tiny, randomly initialised pipelines of the real diffusers classes, for tests, the demo and CPU benchmarks.

Everything is built in code (tokenizers included), so nothing is downloaded. Save a pipeline with
`save_tiny_pipeline` and load it back through the same `from_pretrained` path a real run uses.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from tokenizers.pre_tokenizers import ByteLevel
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)


@dataclass(frozen=True)
class TinyGeometry:
    """Latent geometry of a tiny pipeline.

    `minimal` keeps every dimension as small as possible; `real` uses the production latent
    layout (16 latent channels, VAE down-sampling factor 8, transformer patch size 2).
    """

    latent_channels: int
    vae_blocks: tuple[int, ...]
    patch_size: int
    sample_size: int


GEOMETRIES: dict[str, TinyGeometry] = {
    "minimal": TinyGeometry(latent_channels=4, vae_blocks=(8,), patch_size=2, sample_size=32),
    "real": TinyGeometry(latent_channels=16, vae_blocks=(8, 8, 8, 8), patch_size=2, sample_size=32),
}

CLIP_MAX_LENGTH = 77
T5_MAX_LENGTH = 64
# Latent normalisation of the tiny SD3 VAE. Its scaling factor 1.5035 is not the real SD3 VAE's 1.5305
# (`testing.architectures.SD3_VAE`); the tiny models and the README's demo numbers were made with it.
SD3_LATENT_NORMALISATION = {"scaling_factor": 1.5035, "shift_factor": 0.0609}
# FLUX.1's latent normalisation, which Z-Image's VAE shares.
FLUX1_LATENT_NORMALISATION = {"scaling_factor": 0.3611, "shift_factor": 0.1159}


def tiny_geometry(geometry: str) -> TinyGeometry:
    """The `GEOMETRIES` entry named `geometry`; a ValueError naming the choices for an unknown name."""
    if geometry not in GEOMETRIES:
        raise ValueError(f"unknown tiny geometry {geometry!r}; choose one of {sorted(GEOMETRIES)}")
    return GEOMETRIES[geometry]


def clip_tokenizer() -> CLIPTokenizer:
    """A byte-level CLIP tokenizer with a 514-entry vocabulary, built in memory."""
    alphabet = ByteLevel.alphabet()
    vocab: dict[str, int] = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in sorted(alphabet):
        vocab[char] = len(vocab)
        vocab[char + "</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=CLIP_MAX_LENGTH)


def t5_tokenizer() -> T5Tokenizer:
    """A character-level T5 (unigram) tokenizer built in memory."""
    pieces = ["<pad>", "</s>", "<unk>", "▁"]
    chars = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,;:!?'\"-()"
    pieces += list(chars) + ["▁" + c for c in chars]
    vocab = [(piece, 0.0 if i < 4 else -float(i)) for i, piece in enumerate(pieces)]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=T5_MAX_LENGTH)


def _clip_text_config(vocab_size: int, hidden: int, projection: int | None = None) -> CLIPTextConfig:
    extra = {} if projection is None else {"projection_dim": projection}
    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=CLIP_MAX_LENGTH,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        hidden_act="gelu",
        **extra,
    )


def _clip_text_encoder(vocab_size: int, hidden: int, projection: int) -> CLIPTextModelWithProjection:
    torch.manual_seed(0)
    return CLIPTextModelWithProjection(_clip_text_config(vocab_size, hidden, projection)).eval()


def _t5_encoder(vocab_size: int, d_model: int) -> T5EncoderModel:
    torch.manual_seed(0)
    config = T5Config(
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=8,
        d_ff=2 * d_model,
        num_layers=1,
        num_heads=2,
        dropout_rate=0.0,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )
    return T5EncoderModel(config).eval()


def vae_layout(geometry: TinyGeometry) -> dict[str, Any]:
    """Block layout of a tiny VAE of `geometry`: one block per `vae_blocks` entry, each but the last halving the side."""
    blocks = len(geometry.vae_blocks)
    return {
        "down_block_types": ("DownEncoderBlock2D",) * blocks,
        "up_block_types": ("UpDecoderBlock2D",) * blocks,
        "block_out_channels": geometry.vae_blocks,
        "layers_per_block": 1,
        "latent_channels": geometry.latent_channels,
        "norm_num_groups": 4,
        "sample_size": geometry.sample_size * 2 ** (blocks - 1),
    }


def tiny_vae(geometry: TinyGeometry, *, scaling_factor: float, shift_factor: float) -> AutoencoderKL:
    """A tiny `AutoencoderKL` of `geometry` with random weights (seed 0) and the given latent normalisation."""
    torch.manual_seed(0)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        **vae_layout(geometry),
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=shift_factor,
        scaling_factor=scaling_factor,
    ).eval()


BUILDERS: dict[str, Callable[[str], DiffusionPipeline]] = {}
"""Model family (the adapter registry's key) -> `builder(geometry)` of its tiny pipeline."""


def tiny_builder(family: str) -> Callable[[Callable[[str], DiffusionPipeline]], Callable[[str], DiffusionPipeline]]:
    """Decorator: register `builder(geometry) -> pipeline` as the tiny pipeline of the adapter family `family`."""

    def register(builder: Callable[[str], DiffusionPipeline]) -> Callable[[str], DiffusionPipeline]:
        if family in BUILDERS and BUILDERS[family].__qualname__ != builder.__qualname__:
            raise ValueError(f"a tiny builder for family {family!r} is already registered")
        BUILDERS[family] = builder
        return builder

    return register


@tiny_builder("sd3")
def tiny_sd3_pipeline(geometry: str = "minimal") -> StableDiffusion3Pipeline:
    """Build a tiny SD3 pipeline with random weights (float32, CPU, eval mode).

    Args:
        geometry: "minimal" (4 latent channels, VAE factor 1, patch 2) or "real" (16 channels,
            VAE factor 8, patch 2).
    """
    geo = tiny_geometry(geometry)
    clip_tok = clip_tokenizer()
    t5_tok = t5_tokenizer()
    clip_hidden, clip_projection, t5_dim = 32, 32, 64
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=geo.sample_size,
        patch_size=geo.patch_size,
        in_channels=geo.latent_channels,
        out_channels=geo.latent_channels,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=t5_dim,
        caption_projection_dim=32,
        pooled_projection_dim=2 * clip_projection,
        pos_embed_max_size=geo.sample_size,
    ).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=tiny_vae(geo, **SD3_LATENT_NORMALISATION),
        text_encoder=_clip_text_encoder(len(clip_tok), clip_hidden, clip_projection),
        tokenizer=clip_tok,
        text_encoder_2=_clip_text_encoder(len(clip_tok), clip_hidden, clip_projection),
        tokenizer_2=clip_tokenizer(),
        text_encoder_3=_t5_encoder(len(t5_tok), t5_dim),
        tokenizer_3=t5_tok,
    )


def _clip_pooled_text_encoder(vocab_size: int, hidden: int) -> CLIPTextModel:
    """A CLIP text model whose pooled output (B, hidden) is FLUX's `pooled_projections`."""
    torch.manual_seed(0)
    return CLIPTextModel(_clip_text_config(vocab_size, hidden)).eval()


@tiny_builder("flux")
def tiny_flux_pipeline(geometry: str = "minimal") -> FluxPipeline:
    """Build a tiny FLUX.1-dev-style pipeline with random weights (float32, CPU, eval mode).

    The transformer has a guidance embedding (as FLUX.1-dev) and always sees 2x2-packed latents,
    so its `patch_size` is 1 and `in_channels = 4 * latent_channels`; the geometry's SD3 patch size
    is not used. The scheduler uses FLUX.1-dev's resolution-dependent shift.

    Args:
        geometry: "minimal" (4 latent channels, VAE factor 1, packed 16 channels) or "real"
            (16 latent channels, VAE factor 8, packed 64 channels).
    """
    geo = tiny_geometry(geometry)
    clip_tok = clip_tokenizer()
    t5_tok = t5_tokenizer()
    clip_hidden, t5_dim = 32, 64
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4 * geo.latent_channels,
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=t5_dim,
        pooled_projection_dim=clip_hidden,
        guidance_embeds=True,
        axes_dims_rope=(4, 2, 2),
    ).eval()
    vae = tiny_vae(geo, **FLUX1_LATENT_NORMALISATION)
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    return FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=_clip_pooled_text_encoder(len(clip_tok), clip_hidden),
        tokenizer=clip_tok,
        text_encoder_2=_t5_encoder(len(t5_tok), t5_dim),
        tokenizer_2=t5_tok,
        transformer=transformer,
    )


def save_tiny_pipeline(path: str | os.PathLike, family: str = "sd3", geometry: str = "minimal") -> str:
    """Build a tiny pipeline of `family` and save it with `save_pretrained` to `path`; returns the path."""
    if family not in BUILDERS:
        raise ValueError(f"unknown model family {family!r}; choose one of {sorted(BUILDERS)}")
    pipeline = BUILDERS[family](geometry)
    pipeline.save_pretrained(str(path))
    return str(path)


def main() -> None:
    """Command line: `python -m flow_grpo.testing OUT_DIR [--family sd3] [--geometry minimal]`."""
    parser = argparse.ArgumentParser(description="Save a tiny random pipeline for offline runs.")
    parser.add_argument("out_dir")
    parser.add_argument("--family", default="sd3", choices=sorted(BUILDERS))
    parser.add_argument("--geometry", default="minimal", choices=sorted(GEOMETRIES))
    args = parser.parse_args()
    save_tiny_pipeline(args.out_dir, args.family, args.geometry)
