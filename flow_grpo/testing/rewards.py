"""Tiny, randomly initialised reward models of the real classes, for tests and CPU benchmarks.

Everything is built in code and saved in the layout a real checkpoint has, so the scorers load
them through their real loading path (``from_pretrained``, open_clip's ``pretrained=<file>``,
``torch.load(weights_only=True)``) with the network blocked:

- :func:`save_tiny_clip`: a ``CLIPModel`` + ``CLIPProcessor`` directory (PickScore, CLIPScore and
  the aesthetic backbone load it with ``from_pretrained``).
- :func:`save_tiny_open_clip`: an open_clip architecture registered under
  :data:`TINY_OPEN_CLIP_NAME` and a checkpoint file laid out like ``HPS_v2.1_compressed.pt``.
- :func:`save_tiny_aesthetic_head`: an :class:`~flow_grpo.rewards.clip_models.AestheticHead`
  state dict saved with ``torch.save`` like the LAION ``.pth`` file.
- :func:`save_tiny_detector`: a ``DetrForObjectDetection`` + ``DetrImageProcessor`` directory for the
  GenEval scorer's box-only detector.
- :func:`save_tiny_mask2former`: a ``Mask2FormerForUniversalSegmentation`` (Swin backbone) +
  ``Mask2FormerImageProcessor`` directory for the GenEval scorer's default detector.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "TINY_CLIP_DIM",
    "TINY_OPEN_CLIP_NAME",
    "register_tiny_open_clip",
    "save_tiny_aesthetic_head",
    "save_tiny_clip",
    "save_tiny_detector",
    "save_tiny_mask2former",
    "save_tiny_open_clip",
    "tiny_clip_model",
    "tiny_clip_processor",
]

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
"""Per-channel mean of the OpenAI CLIP image normalisation (also used by PickScore and HPSv2)."""
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
"""Per-channel std of the OpenAI CLIP image normalisation."""

TINY_CLIP_DIM = 32
"""Hidden and projection size of the tiny CLIP models (the aesthetic head input size)."""

TINY_OPEN_CLIP_NAME = "flow-grpo-tiny-ViT"
"""open_clip architecture name under which :func:`register_tiny_open_clip` registers the tiny config."""

_REGISTER_LOCK = threading.Lock()
_REGISTERED_SIZES: dict[int, str] = {}


def tiny_clip_processor(image_size: int = 32, resample: int = 3):
    """A ``CLIPProcessor`` with an in-memory byte-level tokenizer and a CLIP image processor.

    Args:
        image_size: shortest-edge resize and centre-crop size in pixels.
        resample: PIL resampling filter code (3 = bicubic, as CLIP uses; 2 = bilinear).
    """
    from transformers import CLIPImageProcessor, CLIPProcessor

    from flow_grpo.testing.pipelines import clip_tokenizer

    image_processor = CLIPImageProcessor(
        do_resize=True,
        size={"shortest_edge": image_size},
        resample=resample,
        do_center_crop=True,
        crop_size={"height": image_size, "width": image_size},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(OPENAI_CLIP_MEAN),
        image_std=list(OPENAI_CLIP_STD),
        do_convert_rgb=True,
    )
    return CLIPProcessor(image_processor=image_processor, tokenizer=clip_tokenizer())


def tiny_clip_model(image_size: int = 32, patch_size: int = 8, seed: int = 0):
    """A ``CLIPModel`` with hidden size 32, two layers per tower and random weights (float32, eval).

    Its text tower matches :func:`flow_grpo.testing.clip_tokenizer` (514 tokens, eos id 1).
    """
    from transformers import CLIPConfig, CLIPModel

    from flow_grpo.testing.pipelines import CLIP_MAX_LENGTH

    config = CLIPConfig(
        text_config={
            "vocab_size": 514,
            "hidden_size": TINY_CLIP_DIM,
            "intermediate_size": 2 * TINY_CLIP_DIM,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "max_position_embeddings": CLIP_MAX_LENGTH,
            "bos_token_id": 0,
            "eos_token_id": 1,
            "pad_token_id": 1,
        },
        vision_config={
            "hidden_size": TINY_CLIP_DIM,
            "intermediate_size": 2 * TINY_CLIP_DIM,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": image_size,
            "patch_size": patch_size,
        },
        projection_dim=TINY_CLIP_DIM,
    )
    torch.manual_seed(seed)
    return CLIPModel(config).eval()


def save_tiny_clip(path: str | os.PathLike, image_size: int = 32, patch_size: int = 8, seed: int = 0) -> str:
    """Save a tiny ``CLIPModel`` and its ``CLIPProcessor`` to ``path``; returns the directory.

    The directory loads with ``CLIPModel.from_pretrained`` and ``AutoProcessor.from_pretrained``,
    so it stands in for ``yuvalkirstain/PickScore_v1`` or ``openai/clip-vit-large-patch14``.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tiny_clip_model(image_size, patch_size, seed).save_pretrained(path)
    tiny_clip_processor(image_size).save_pretrained(path)
    return str(path)


def register_tiny_open_clip(image_size: int = 32) -> str:
    """Register a tiny open_clip ViT config with open_clip and return its architecture name.

    The config has the structure of ``ViT-H-14`` (ViT vision tower, transformer text tower with
    open_clip's BPE tokenizer) at width 32. Registering twice is a no-op.
    """
    import open_clip

    with _REGISTER_LOCK:
        if image_size in _REGISTERED_SIZES:
            return _REGISTERED_SIZES[image_size]
        name = TINY_OPEN_CLIP_NAME if image_size == 32 else f"{TINY_OPEN_CLIP_NAME}-{image_size}"
        config = {
            "embed_dim": TINY_CLIP_DIM,
            "vision_cfg": {
                "image_size": image_size,
                "layers": 2,
                "width": TINY_CLIP_DIM,
                "head_width": 16,
                "patch_size": 8,
            },
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": TINY_CLIP_DIM, "heads": 2, "layers": 2},
        }
        # open_clip registers architectures from JSON files named after the architecture.
        config_dir = Path(tempfile.mkdtemp(prefix="flow-grpo-open-clip-"))
        config_file = config_dir / f"{name}.json"
        config_file.write_text(json.dumps(config))
        open_clip.add_model_config(config_file)
        _REGISTERED_SIZES[image_size] = name
        return name


def save_tiny_open_clip(path: str | os.PathLike, image_size: int = 32, seed: int = 0) -> tuple[str, str]:
    """Save a tiny open_clip checkpoint laid out like ``HPS_v2.1_compressed.pt``.

    Returns:
        ``(architecture, checkpoint_file)``: pass them as ``reward_options.hpsv2.architecture``
        and ``reward_options.hpsv2.checkpoint``.
    """
    import open_clip

    name = register_tiny_open_clip(image_size)
    torch.manual_seed(seed)
    model = open_clip.create_model(name, pretrained=None)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    checkpoint = path / "tiny_hps.pt"
    # HPS v2 checkpoints are a dict with the model weights under "state_dict".
    torch.save({"state_dict": model.state_dict()}, checkpoint)
    return name, str(checkpoint)


def save_tiny_aesthetic_head(path: str | os.PathLike, input_dim: int = TINY_CLIP_DIM, seed: int = 0) -> str:
    """Save a randomly initialised aesthetic MLP head state dict as ``path/aesthetic_head.pth``."""
    from flow_grpo.rewards.clip_models import AestheticHead

    torch.manual_seed(seed)
    head = AestheticHead(input_dim)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    file = path / "aesthetic_head.pth"
    torch.save(head.state_dict(), file)
    return str(file)


def _label_maps(labels: tuple[str, ...]) -> dict[str, dict]:
    """A model config's `id2label` and `label2id` for `labels` (class i is labels[i])."""
    return {"id2label": dict(enumerate(labels)), "label2id": {label: i for i, label in enumerate(labels)}}


def _save_with_processor(path: str | os.PathLike, seed: int, build: Callable[[], torch.nn.Module], processor: Any) -> str:
    """Build a model with random weights from `seed` and save it in eval mode with its `processor` to `path`."""
    torch.manual_seed(seed)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    build().eval().save_pretrained(path)
    processor.save_pretrained(path)
    return str(path)


def save_tiny_detector(path: str | os.PathLike, labels: tuple[str, ...] = ("dog", "cat"), seed: int = 0) -> str:
    """Save a tiny DETR object detector (ResNet backbone built in code) and its processor to ``path``."""
    from transformers import DetrConfig, DetrForObjectDetection, DetrImageProcessor, ResNetConfig

    backbone = ResNetConfig(embedding_size=8, hidden_sizes=[8, 8, 8, 8], depths=[1, 1, 1, 1], out_features=["stage4"])
    config = DetrConfig(
        use_timm_backbone=False,
        use_pretrained_backbone=False,
        backbone=None,
        backbone_config=backbone,
        d_model=16,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=16,
        decoder_ffn_dim=16,
        num_queries=5,
        **_label_maps(labels),
    )
    processor = DetrImageProcessor(size={"shortest_edge": 32, "longest_edge": 64})
    return _save_with_processor(path, seed, lambda: DetrForObjectDetection(config), processor)


def save_tiny_mask2former(
    path: str | os.PathLike, labels: tuple[str, ...] = ("dog", "cat"), seed: int = 0, num_queries: int = 8
) -> str:
    """Save a tiny Mask2Former instance-segmentation model and its image processor to ``path``.

    A four-stage Swin backbone of width 8 and a pixel/transformer decoder of width 32 (the smallest
    the decoder's 32-group norms allow), built from configs with random weights; constructing the
    model needs scipy (transformers' Mask2Former loss). Returns the directory, which loads with
    ``Mask2FormerForUniversalSegmentation.from_pretrained`` and ``AutoImageProcessor.from_pretrained``.
    """
    from transformers import (
        Mask2FormerConfig,
        Mask2FormerForUniversalSegmentation,
        Mask2FormerImageProcessor,
        SwinConfig,
    )

    backbone = SwinConfig(
        image_size=32,
        patch_size=4,
        embed_dim=8,
        depths=[1, 1, 1, 1],
        num_heads=[1, 1, 1, 1],
        window_size=2,
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )
    config = Mask2FormerConfig(
        backbone_config=backbone,
        use_pretrained_backbone=False,
        feature_size=32,
        mask_feature_size=32,
        hidden_dim=32,
        encoder_feedforward_dim=32,
        dim_feedforward=32,
        encoder_layers=1,
        decoder_layers=2,
        num_attention_heads=2,
        num_queries=num_queries,
        **_label_maps(labels),
    )
    processor = Mask2FormerImageProcessor(size={"shortest_edge": 64, "longest_edge": 128}, size_divisor=32)
    return _save_with_processor(path, seed, lambda: Mask2FormerForUniversalSegmentation(config), processor)
