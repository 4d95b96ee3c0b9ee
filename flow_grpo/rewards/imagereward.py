"""ImageReward (Xu et al., 2023) scored in-project with transformers' BLIP classes.

The authors' package (``image-reward`` 1.5) does not import with transformers 5: its BLIP text
encoder (``ImageReward/models/BLIP/med.py``) imports ``apply_chunking_to_forward`` and
``find_pruneable_heads_and_indices`` from ``transformers.modeling_utils``, which transformers 5
removed. This module runs the same model:

- a BLIP ViT (ViT-L/16 at 224 px in the published weights; pre-norm blocks, LayerNorm eps 1e-6, a fused
  ``qkv``) as :class:`transformers.BlipVisionModel`;
- BLIP's BERT text encoder with a cross-attention to the image tokens in every layer (the ``med``
  BertModel without pooler, configured by the authors' ``med_config.json``) as
  :class:`transformers.BlipTextModel`, run bidirectionally;
- the MLP on the text encoder's first token (``Linear 768-1024-128-64-16-1``, no activations; the same
  layout as :class:`~flow_grpo.rewards.clip_models.AestheticHead`), whose output is normalised as
  ``(x - 0.16717...) / 1.03333...``.

Inputs as the package's ``ImageReward.score``: the prompt through the ``bert-base-uncased`` tokenizer with
the ``[DEC]`` and ``[ENC]`` special tokens added, truncated and padded to 35 tokens; the image resized (bicubic, shorter
side) and centre-cropped to 224 px, normalised with the CLIP mean and std. The checkpoint is the
package's ``ImageReward.pt`` (the module's state dict: ``blip.visual_encoder.*``, ``blip.text_encoder.*``,
``mlp.layers.*``); its ViT sizes are read from the tensors (64-wide attention heads, as ViT-L/16).
``tests/test_preference_parity.py`` checks scores against the package on tiny weights.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from accelerate.logging import get_logger
from PIL import Image
from torch import nn

from flow_grpo.rewards.clip_models import AestheticHead
from flow_grpo.rewards.key_maps import KeyMap
from flow_grpo.command_flags import InputNotFoundError, InputValueError
from flow_grpo.rewards.options import chunk_slices, parse_options, resolve_dtype, resolve_weights_file
from flow_grpo.rewards.registry import register_reward
from flow_grpo.rewards.transport import images_to_uint8

__all__ = [
    "IMAGEREWARD_DEFAULTS",
    "IMAGEREWARD_KEYS",
    "IMAGEREWARD_MEAN",
    "IMAGEREWARD_STD",
    "ImageRewardModel",
    "ImageRewardScorer",
    "imagereward_configs",
    "imagereward_tokenizer",
    "load_imagereward",
    "make_imagereward",
    "preprocess",
]

logger = get_logger(__name__)

IMAGEREWARD_DEFAULTS: dict[str, Any] = {
    "checkpoint": "THUDM/ImageReward:ImageReward.pt",
    "med_config": "THUDM/ImageReward:med_config.json",
    "tokenizer": "bert-base-uncased",
    "dtype": "float32",
    "batch_size": 32,
}
"""Options of ``imagereward`` (mirrored in ``config/base.py``); float32 as the authors score."""

# The package's normalisation of the MLP output (ImageReward/ImageReward.py: self.mean, self.std).
IMAGEREWARD_MEAN = 0.16717362830052426
IMAGEREWARD_STD = 1.0333394966054072
IMAGE_SIZE = 224
PROMPT_TOKENS = 35
VISION_HEAD_DIM = 64
VISION_LAYER_NORM_EPS = 1e-6
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_USE_THE_CHECKPOINT = "point reward_options.imagereward.checkpoint at the published ImageReward.pt"

IMAGEREWARD_KEYS = KeyMap(
    [
        ("blip.visual_encoder.cls_token", "vision.embeddings.class_embedding"),
        ("blip.visual_encoder.pos_embed", "vision.embeddings.position_embedding"),
        ("blip.visual_encoder.patch_embed.proj.{p}", "vision.embeddings.patch_embedding.{p}"),
        ("blip.visual_encoder.blocks.{i}.norm1.{p}", "vision.encoder.layers.{i}.layer_norm1.{p}"),
        ("blip.visual_encoder.blocks.{i}.norm2.{p}", "vision.encoder.layers.{i}.layer_norm2.{p}"),
        ("blip.visual_encoder.blocks.{i}.attn.qkv.{p}", "vision.encoder.layers.{i}.self_attn.qkv.{p}"),
        ("blip.visual_encoder.blocks.{i}.attn.proj.{p}", "vision.encoder.layers.{i}.self_attn.projection.{p}"),
        ("blip.visual_encoder.blocks.{i}.mlp.fc1.{p}", "vision.encoder.layers.{i}.mlp.fc1.{p}"),
        ("blip.visual_encoder.blocks.{i}.mlp.fc2.{p}", "vision.encoder.layers.{i}.mlp.fc2.{p}"),
        ("blip.visual_encoder.norm.{p}", "vision.post_layernorm.{p}"),
        # transformers' BLIP text classes keep the med module names.
        ("blip.text_encoder.{rest}", "text.{rest}"),
        ("mlp.layers.{rest}", "head.layers.{rest}"),
    ]
)
"""``ImageReward.pt`` keys <-> :class:`ImageRewardModel` parameters (``blip.vision_proj`` / ``text_proj`` are unused)."""


class ImageRewardModel(nn.Module):
    """BLIP ViT + BLIP text encoder with image cross-attention + MLP head; scores are normalised."""

    def __init__(self, vision_config: Any, text_config: Any) -> None:
        from transformers import BlipTextModel, BlipVisionModel

        super().__init__()
        self.vision = BlipVisionModel(vision_config)
        self.text = BlipTextModel(text_config, add_pooling_layer=False)
        self.head = AestheticHead(text_config.hidden_size)

    def forward(self, pixels: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``pixels (N, 3, 224, 224)``, ``input_ids``/``attention_mask (N, 35)`` -> normalised scores ``(N,)`` float32."""
        image_states = self.vision(pixel_values=pixels).last_hidden_state
        image_mask = torch.ones(image_states.shape[:-1], dtype=torch.long, device=image_states.device)
        text_states = self.text(
            input_ids=input_ids,
            attention_mask=attention_mask,
            encoder_hidden_states=image_states,
            encoder_attention_mask=image_mask,
            is_decoder=False,
        ).last_hidden_state
        # The package runs its MLP in float32 on the first token's feature.
        raw = self.head(text_states[:, 0].float())
        return (raw - IMAGEREWARD_MEAN) / IMAGEREWARD_STD


def imagereward_configs(state: Mapping[str, torch.Tensor], med_config: Mapping[str, Any]) -> tuple[Any, Any]:
    """The BLIP vision and text configs of a checkpoint (published key names) and its ``med_config.json``."""
    from transformers import BlipTextConfig, BlipVisionConfig

    width = state["blip.visual_encoder.cls_token"].shape[-1]
    patch = state["blip.visual_encoder.patch_embed.proj.weight"].shape[-1]
    positions = state["blip.visual_encoder.pos_embed"].shape[1]
    if positions != (IMAGE_SIZE // patch) ** 2 + 1:
        raise InputValueError(
            f"the checkpoint's ViT has {positions} positions, not those of {IMAGE_SIZE} px at patch {patch}; {_USE_THE_CHECKPOINT}"
        )
    depth = 1 + max(int(key.split(".")[3]) for key in state if key.startswith("blip.visual_encoder.blocks."))
    vision = BlipVisionConfig(
        hidden_size=width,
        intermediate_size=state["blip.visual_encoder.blocks.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=depth,
        num_attention_heads=width // VISION_HEAD_DIM,
        image_size=IMAGE_SIZE,
        patch_size=patch,
        hidden_act="gelu",
        layer_norm_eps=VISION_LAYER_NORM_EPS,
    )
    text = BlipTextConfig(
        vocab_size=med_config["vocab_size"],
        hidden_size=med_config["hidden_size"],
        encoder_hidden_size=width,  # the package sets encoder_width to the ViT's width
        intermediate_size=med_config["intermediate_size"],
        num_hidden_layers=med_config["num_hidden_layers"],
        num_attention_heads=med_config["num_attention_heads"],
        max_position_embeddings=med_config["max_position_embeddings"],
        hidden_act=med_config.get("hidden_act", "gelu"),
        layer_norm_eps=med_config.get("layer_norm_eps", 1e-12),
        pad_token_id=med_config.get("pad_token_id", 0),
        bos_token_id=None,  # generation ids; the encoder does not use them
        eos_token_id=None,
        sep_token_id=None,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        is_decoder=True,  # builds the cross-attention layers; forward runs bidirectionally
    )
    return vision, text


def imagereward_tokenizer(name: str) -> Any:
    """The BERT tokenizer ``name`` with BLIP's ``[DEC]`` (bos) and ``[ENC]`` special tokens, as the package adds them."""
    from transformers import BertTokenizer

    tokenizer = BertTokenizer.from_pretrained(name)
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tokenizer


def preprocess(image: Image.Image) -> torch.Tensor:
    """An RGB PIL image -> ``(3, 224, 224)`` float32: bicubic resize of the shorter side, centre crop, CLIP normalisation."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as tf

    image = tf.center_crop(tf.resize(image, IMAGE_SIZE, interpolation=InterpolationMode.BICUBIC), IMAGE_SIZE)
    return tf.normalize(tf.to_tensor(image), CLIP_MEAN, CLIP_STD)


def load_imagereward(checkpoint: str, med_config: str) -> ImageRewardModel:
    """Build :class:`ImageRewardModel` from ``ImageReward.pt`` and ``med_config.json`` (local files), float32 on the CPU."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    if not isinstance(state, Mapping) or "blip.visual_encoder.cls_token" not in state:
        raise InputValueError(
            f"{checkpoint!r} is not an ImageReward checkpoint (no 'blip.visual_encoder.cls_token' tensor); {_USE_THE_CHECKPOINT}"
        )
    with open(med_config, encoding="utf-8") as file:
        vision_config, text_config = imagereward_configs(state, json.load(file))
    model = ImageRewardModel(vision_config, text_config)
    missing, _ = model.load_state_dict(IMAGEREWARD_KEYS.to_module(state), strict=False)
    missing = [key for key in missing if not key.endswith("position_ids")]
    if missing:
        raise InputValueError(f"{checkpoint!r} lacks ImageReward weights, e.g. {missing[:3]}; {_USE_THE_CHECKPOINT}")
    return model.eval().requires_grad_(False)


class ImageRewardScorer:
    """``reward(images, prompts, metadata) -> ImageReward score``; ``model`` is the :class:`ImageRewardModel`."""

    def __init__(
        self, model: ImageRewardModel, tokenizer: Any, device: torch.device, dtype: torch.dtype, batch_size: int
    ) -> None:
        if len(tokenizer) > model.text.config.vocab_size:
            raise InputValueError(
                f"the tokenizer has {len(tokenizer)} tokens, more than the text encoder's {model.text.config.vocab_size}; "
                "use the tokenizer the checkpoint was trained with (bert-base-uncased)"
            )
        self.model = model.to(device=device, dtype=dtype)
        self.model.head.float()
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.dtype = dtype
        self.batch_size = batch_size

    @torch.no_grad()
    def __call__(
        self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]
    ) -> torch.Tensor:
        """``(N, 3, H, W)`` in [0, 1] or uint8 -> float32 ``(N,)`` CPU ImageReward score."""
        pixels = images_to_uint8(images)
        scores = []
        for part in chunk_slices(len(pixels), self.batch_size):
            batch = torch.stack([preprocess(Image.fromarray(image)) for image in pixels[part]])
            tokens = self.tokenizer(
                list(prompts[part]), padding="max_length", truncation=True, max_length=PROMPT_TOKENS, return_tensors="pt"
            ).to(self.device)
            scores.append(
                self.model(batch.to(self.device, self.dtype), tokens["input_ids"], tokens["attention_mask"]).float().cpu()
            )
        return torch.cat(scores)


@register_reward("imagereward")
def make_imagereward(device: torch.device, options: Mapping[str, Any]) -> ImageRewardScorer:
    """ImageReward from the published ``ImageReward.pt`` (module docstring)."""
    opts = parse_options("imagereward", options, IMAGEREWARD_DEFAULTS)
    dtype = resolve_dtype(opts["dtype"], device, "imagereward")
    checkpoint = resolve_weights_file(opts["checkpoint"], "imagereward", "checkpoint")
    med_config = resolve_weights_file(opts["med_config"], "imagereward", "med_config")
    try:
        tokenizer = imagereward_tokenizer(opts["tokenizer"])
    except (OSError, ValueError) as error:
        raise InputNotFoundError(
            f"Could not load the imagereward tokenizer {opts['tokenizer']!r} ({error}); set "
            "reward_options.imagereward.tokenizer to 'bert-base-uncased' or a local copy of it."
        ) from error
    model = load_imagereward(checkpoint, med_config)
    logger.info(f"Loaded imagereward from {checkpoint!r} ({dtype}) on {device}", main_process_only=False)
    return ImageRewardScorer(model, tokenizer, device, dtype, opts["batch_size"])
