"""JPEG (in)compressibility rewards from DDPO: weight-free, so they suit tests and demos.

``jpeg_compressibility`` is minus the JPEG file size in kB (1 kB = 1000 bytes) at quality 95;
``jpeg_incompressibility`` is plus that size.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from flow_grpo.rewards.images import to_uint8
from flow_grpo.rewards.registry import RewardFn, register_reward

__all__ = ["JPEG_QUALITY", "jpeg_compressibility", "jpeg_incompressibility", "jpeg_size_kb"]

JPEG_QUALITY = 95
"""PIL JPEG quality used for the size measurement."""


def jpeg_size_kb(images: torch.Tensor) -> torch.Tensor:
    """JPEG file size of each image in kB (bytes / 1000), quality 95.

    Args:
        images: float ``(N, 3, H, W)`` in ``[0, 1]`` (rounded to uint8 with `to_uint8` before
            encoding) or uint8 in ``0..255``, any device.

    Returns:
        float32 ``(N,)`` on the CPU.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"jpeg_size_kb expects images of shape (N, 3, H, W), got {tuple(images.shape)}.")
    pixels = to_uint8(images).permute(0, 2, 3, 1).cpu().numpy()  # (N, H, W, 3) as PIL wants
    sizes = np.empty(len(pixels), dtype=np.float32)
    for i, pixel_array in enumerate(pixels):
        buffer = io.BytesIO()
        Image.fromarray(pixel_array).save(buffer, format="JPEG", quality=JPEG_QUALITY)
        sizes[i] = buffer.tell() / 1000.0
    return torch.from_numpy(sizes)


def jpeg_compressibility(
    images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]
) -> torch.Tensor:
    """Minus the JPEG size in kB: ``(N, 3, H, W)`` in [0, 1] or uint8 -> float32 ``(N,)`` CPU.

    Prompts and metadata are ignored.
    """
    return -jpeg_size_kb(images)


def jpeg_incompressibility(
    images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]
) -> torch.Tensor:
    """The JPEG size in kB: ``(N, 3, H, W)`` in [0, 1] or uint8 -> float32 ``(N,)`` CPU.

    Prompts and metadata are ignored.
    """
    return jpeg_size_kb(images)


def _no_options(name: str, options: Mapping[str, Any]) -> None:
    if options:
        raise ValueError(
            f"Reward {name!r} takes no options, got {sorted(options)}; remove them from the config."
        )


@register_reward("jpeg_compressibility")
def make_jpeg_compressibility(device: torch.device, options: Mapping[str, Any]) -> RewardFn:
    """Factory for :func:`jpeg_compressibility` (runs on the CPU whatever ``device`` is)."""
    _no_options("jpeg_compressibility", options)
    return jpeg_compressibility


@register_reward("jpeg_incompressibility")
def make_jpeg_incompressibility(device: torch.device, options: Mapping[str, Any]) -> RewardFn:
    """Factory for :func:`jpeg_incompressibility` (runs on the CPU whatever ``device`` is)."""
    _no_options("jpeg_incompressibility", options)
    return jpeg_incompressibility
