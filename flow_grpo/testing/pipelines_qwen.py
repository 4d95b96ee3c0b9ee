"""Tiny pipelines whose text encoder is a Qwen language model: FLUX.2-klein, Z-Image and Qwen-Image.

Both read the prompt through the tokenizer's chat template and a Qwen3 decoder's hidden states. The
tokenizer (byte-level, no merges, the Qwen chat markers as special tokens) and every model are built
in code with random weights, so nothing is downloaded. Geometries are those of
`flow_grpo.testing.pipelines.GEOMETRIES`.
"""

from __future__ import annotations

import torch
from diffusers import (
    AutoencoderKLFlux2,
    FlowMatchEulerDiscreteScheduler,
    AutoencoderKLQwenImage,
    Flux2KleinPipeline,
    Flux2Transformer2DModel,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
    ZImagePipeline,
    ZImageTransformer2DModel,
)
from tokenizers.pre_tokenizers import ByteLevel
from transformers import (
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Tokenizer,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3Model,
)

from flow_grpo.testing.pipelines import FLUX1_LATENT_NORMALISATION, tiny_builder, tiny_geometry, tiny_vae, vae_layout

__all__ = [
    "QWEN_CHAT_TEMPLATE",
    "qwen_tokenizer",
    "tiny_flux2_klein_pipeline",
    "tiny_qwen_image_pipeline",
    "tiny_z_image_pipeline",
]

# A minimal Qwen3-style chat template: user turn, assistant prefix, and the empty thinking block that
# Qwen3's own template adds when `enable_thinking=False` (FLUX.2-klein asks for it; Z-Image does not).
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)
QWEN_HIDDEN = 16
# FLUX.2-klein stacks the hidden states of layers 9, 18 and 27 (`text_encoder_out_layers`), so the
# tiny encoder keeps 28 layers; they are 16 wide, which keeps it small.
QWEN_LAYERS = 28


def qwen_tokenizer() -> Qwen2Tokenizer:
    """A byte-level Qwen2 tokenizer (256 byte tokens + chat markers, no merges) with a chat template."""
    vocab = {char: i for i, char in enumerate(sorted(ByteLevel.alphabet()))}
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[], model_max_length=512)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<think>", "</think>"]})
    tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    return tokenizer


def _qwen3_config(vocab_size: int) -> Qwen3Config:
    return Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=QWEN_HIDDEN,
        intermediate_size=2 * QWEN_HIDDEN,
        num_hidden_layers=QWEN_LAYERS,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    )


@tiny_builder("flux2_klein")
def tiny_flux2_klein_pipeline(geometry: str = "minimal", distilled: bool = False) -> Flux2KleinPipeline:
    """A tiny FLUX.2-klein pipeline (float32, CPU, eval mode): Qwen3 text encoder, BatchNorm-normalised VAE.

    Args:
        geometry: "minimal" (4 latent channels, VAE factor 1) or "real" (16 channels, VAE factor 8);
            latents are patchified 2x2 and packed, so the transformer sees 4x the channels.
        distilled: the step-distilled variant (no CFG, `is_distilled=True`) instead of the base model.
    """
    geo = tiny_geometry(geometry)
    tokenizer = qwen_tokenizer()
    torch.manual_seed(0)
    text_encoder = Qwen3ForCausalLM(_qwen3_config(len(tokenizer))).eval()
    torch.manual_seed(0)
    transformer = Flux2Transformer2DModel(
        patch_size=1,
        in_channels=4 * geo.latent_channels,
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=3 * QWEN_HIDDEN,
        timestep_guidance_channels=16,
        axes_dims_rope=(2, 2, 2, 2),
        guidance_embeds=False,
    ).eval()
    torch.manual_seed(0)
    vae = AutoencoderKLFlux2(**vae_layout(geo)).eval()
    # Non-trivial latent statistics, so decoding checks the de-normalisation.
    generator = torch.Generator().manual_seed(1)
    vae.bn.running_mean.copy_(0.1 * torch.randn(vae.bn.running_mean.shape, generator=generator))
    vae.bn.running_var.copy_(0.5 + torch.rand(vae.bn.running_var.shape, generator=generator))
    # FLUX.2's scheduler: dynamic exponential shift, `mu` from `compute_empirical_mu`.
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096, time_shift_type="exponential",
    )
    return Flux2KleinPipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer,
        is_distilled=distilled,
    )


@tiny_builder("z_image")
def tiny_z_image_pipeline(geometry: str = "minimal") -> ZImagePipeline:
    """A tiny Z-Image pipeline (float32, CPU, eval mode): Qwen3 text encoder, S3-DiT transformer.

    Args:
        geometry: "minimal" (4 latent channels, VAE factor 1) or "real" (16 channels, VAE factor 8);
            the transformer patchifies 2x2 itself.
    """
    geo = tiny_geometry(geometry)
    tokenizer = qwen_tokenizer()
    torch.manual_seed(0)
    text_encoder = Qwen3Model(_qwen3_config(len(tokenizer))).eval()
    torch.manual_seed(0)
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,),
        all_f_patch_size=(1,),
        in_channels=geo.latent_channels,
        dim=32,
        n_layers=2,
        n_refiner_layers=1,
        n_heads=2,
        n_kv_heads=2,
        cap_feat_dim=QWEN_HIDDEN,
        axes_dims=[4, 6, 6],
        axes_lens=[256, 64, 64],
    ).eval()
    vae = tiny_vae(geo, **FLUX1_LATENT_NORMALISATION)  # Z-Image uses the FLUX.1 VAE
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=False)
    return ZImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer)



def _match_template_prefix(pipeline: QwenImagePipeline) -> None:
    """Add one token to the pipeline's tokenizer so that its prompt template's prefix (system turn and user
    marker) is exactly the `prompt_template_encode_start_idx` tokens the pipeline drops, as with the real
    Qwen tokenizer; the features then start at the user's prompt."""
    tokenizer = pipeline.tokenizer
    prefix = pipeline.prompt_template_encode.split("{}")[0]
    drop = pipeline.prompt_template_encode_start_idx
    system = prefix.split("<|im_start|>")[1].split("<|im_end|>")[0]  # "system\nDescribe ... background:"
    excess = len(tokenizer(prefix).input_ids) - drop
    tokenizer.add_tokens([system[: excess + 1]])
    if len(tokenizer(prefix).input_ids) != drop:
        raise RuntimeError("the tiny Qwen tokenizer does not split the Qwen-Image template prefix as the pipeline expects")


@tiny_builder("qwen_image")
def tiny_qwen_image_pipeline(geometry: str = "minimal") -> QwenImagePipeline:
    """A tiny Qwen-Image pipeline (float32, CPU, eval mode): Qwen2.5-VL text encoder, causal-3D VAE.

    Args:
        geometry: "minimal" (4 latent channels, VAE factor 1) or "real" (16 channels, VAE factor 8);
            latents are packed 2x2, so the transformer sees 4x the channels.
    """
    geo = tiny_geometry(geometry)
    tokenizer = qwen_tokenizer()
    text = {
        "vocab_size": len(tokenizer) + 1,  # and the template-prefix token `_match_template_prefix` adds
        "hidden_size": QWEN_HIDDEN, "intermediate_size": 2 * QWEN_HIDDEN,
        "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 512,
        "rope_scaling": {"type": "mrope", "mrope_section": [2, 1, 1]},  # head_dim 8: 4 rotary pairs
        "bos_token_id": tokenizer.convert_tokens_to_ids("<|im_start|>"),
        "eos_token_id": tokenizer.convert_tokens_to_ids("<|im_end|>"),
    }
    vision = {"depth": 1, "hidden_size": 16, "intermediate_size": 32, "num_heads": 2, "out_hidden_size": QWEN_HIDDEN}
    torch.manual_seed(0)
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, bos_token_id=text["bos_token_id"], eos_token_id=text["eos_token_id"])
    text_encoder = Qwen2_5_VLForConditionalGeneration(config).eval()
    torch.manual_seed(0)
    transformer = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=4 * geo.latent_channels,
        out_channels=geo.latent_channels,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=QWEN_HIDDEN,
        axes_dims_rope=(2, 2, 4),
    ).eval()
    downsamples = len(geo.vae_blocks) - 1
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(1)  # non-trivial latent statistics, so decoding checks them
    vae = AutoencoderKLQwenImage(
        base_dim=8,
        z_dim=geo.latent_channels,
        dim_mult=[1] * (downsamples + 1),
        num_res_blocks=1,
        temperal_downsample=[False] + [True] * (downsamples - 1) if downsamples else [],
        latents_mean=(0.1 * torch.randn(geo.latent_channels, generator=generator)).tolist(),
        latents_std=(0.5 + torch.rand(geo.latent_channels, generator=generator)).tolist(),
    ).eval()
    # Qwen-Image's scheduler: exponential dynamic shift with a terminal shift (testing.architectures_qwen).
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9, base_image_seq_len=256,
        max_image_seq_len=8192, shift_terminal=0.02, time_shift_type="exponential",
    )
    pipeline = QwenImagePipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer
    )
    _match_template_prefix(pipeline)
    return pipeline
