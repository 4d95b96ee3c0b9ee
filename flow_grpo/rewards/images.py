"""The two image encodings rewards accept, and the one rounding between them.

Rewards take images ``(N, 3, H, W)`` either as float in ``[0, 1]`` or as uint8 in ``0..255``.
Every built-in reward works on 8-bit pixels (the CLIP processors, JPEG, the reward server's
transport), so float images are rounded with :func:`to_uint8`; handing a reward the uint8 images
:func:`to_uint8` made gives exactly the scores of the float images, at a quarter of the memory.
"""

from __future__ import annotations

import torch

__all__ = ["to_uint8", "to_unit_float"]


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Float ``(N, 3, H, W)`` in ``[0, 1]`` -> uint8 ``(N, 3, H, W)`` on the same device; uint8 passes through.

    Values are scaled by 255, NaN becomes 0, then clamped to ``[0, 255]`` and rounded half to even.
    """
    if images.dtype == torch.uint8:
        return images.detach()
    return images.detach().float().mul(255.0).nan_to_num_(0.0).clamp_(0.0, 255.0).round_().to(torch.uint8)


def to_unit_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``(N, 3, H, W)`` -> float32 in ``[0, 1]``; float images are returned as they are (detached)."""
    if images.dtype == torch.uint8:
        return images.float().div_(255.0)
    return images.detach()
