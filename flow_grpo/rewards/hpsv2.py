"""HPS v2.1 (Human Preference Score) through open_clip.

HPS v2.1 is an open_clip ``ViT-H-14`` fine-tuned on human preferences; its checkpoint
(``HPS_v2.1_compressed.pt``, weights under ``"state_dict"``) holds every weight, so the model is
created directly from it with ``open_clip.create_model_and_transforms(arch, pretrained=<file>)``.
The score is the cosine similarity of the image and prompt embeddings (no logit scale).

open_clip is imported inside the factory.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from accelerate.logging import get_logger

from flow_grpo.rewards.clip_models import EmbeddingEncoder
from flow_grpo.command_flags import InputValueError
from flow_grpo.rewards.options import parse_options, resolve_dtype, resolve_weights_file
from flow_grpo.rewards.preprocess import ImagePreprocess
from flow_grpo.rewards.registry import register_reward

__all__ = ["HPSV2_DEFAULTS", "HpsReward", "OpenClipEncoder", "make_hpsv2"]

logger = get_logger(__name__)

HPSV2_DEFAULTS: dict[str, Any] = {
    "architecture": "ViT-H-14",
    "checkpoint": "xswu/HPSv2:HPS_v2.1_compressed.pt",
    "dtype": "auto",
    "batch_size": 64,
}
"""Options of ``hpsv2`` (mirrored in ``config/base.py``)."""


class OpenClipEncoder(EmbeddingEncoder):
    """An open_clip model (HPS v2.1) with its tokenizer and an on-device image preprocessing."""

    @classmethod
    def load(
        cls, reward: str, architecture: str, checkpoint: str, device: torch.device, dtype_name: str, batch_size: int
    ) -> OpenClipEncoder:
        """Create ``architecture`` from the checkpoint file (local path or ``"<repo>:<file>"``)."""
        import open_clip

        dtype = resolve_dtype(dtype_name, device, reward)
        if ":" not in architecture and architecture not in open_clip.list_models():
            raise InputValueError(
                f"reward_options.{reward}.architecture = {architecture!r} is not an open_clip architecture; "
                "use e.g. 'ViT-H-14' (register custom configs with open_clip.add_model_config)."
            )
        checkpoint_file = resolve_weights_file(checkpoint, reward, "checkpoint")
        try:
            model, _, _ = open_clip.create_model_and_transforms(architecture, pretrained=checkpoint_file)
        except RuntimeError as error:
            raise InputValueError(
                f"Could not load {checkpoint_file!r} into open_clip {architecture!r} ({error}); check that "
                f"reward_options.{reward}.architecture matches the checkpoint."
            ) from error
        preprocess = ImagePreprocess.from_open_clip(model.visual.preprocess_cfg)
        tokenizer = open_clip.get_tokenizer(architecture)
        logger.info(
            f"Loaded {reward} {architecture} from {checkpoint_file!r} ({dtype}) on {device}", main_process_only=False
        )
        return cls(model, tokenizer, preprocess, device, dtype, batch_size)

    def _encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixels)

    def _encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        return self.model.encode_text(self.tokenizer(prompts).to(self.device))


class HpsReward:
    """``reward(images, prompts, metadata) = cos(image, prompt)`` with the HPS v2.1 open_clip model.

    Attributes:
        encoder: the :class:`OpenClipEncoder` (exposed for benchmarks and tests).
    """

    def __init__(self, encoder: OpenClipEncoder) -> None:
        self.encoder = encoder

    def __call__(
        self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]
    ) -> torch.Tensor:
        """``(N, 3, H, W)`` in [0, 1] or uint8 -> float32 ``(N,)`` CPU HPS v2.1 score."""
        image = self.encoder.image_embeddings(images)
        return (image * self.encoder.text_embeddings(prompts)).sum(dim=-1).cpu()


@register_reward("hpsv2")
def make_hpsv2(device: torch.device, options: Mapping[str, Any]) -> HpsReward:
    """HPS v2.1: cosine similarity of open_clip image and prompt embeddings."""
    opts = parse_options("hpsv2", options, HPSV2_DEFAULTS)
    encoder = OpenClipEncoder.load(
        "hpsv2", opts["architecture"], opts["checkpoint"], device, opts["dtype"], opts["batch_size"]
    )
    return HpsReward(encoder)
