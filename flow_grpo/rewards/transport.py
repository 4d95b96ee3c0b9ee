"""Image transport of the reward-server protocol: the JSON image encodings and their decoding.

The client (:mod:`flow_grpo.rewards.remote`) encodes a batch with :func:`encode_images`; the server
(:mod:`flow_grpo.reward_server.server`) decodes it with :func:`decode_images`, which validates every field
before a pixel is allocated. ``png``: each image is a base64 PNG (RGB, 8 bit). ``raw``: each image is the
base64 of its ``H * W * 3`` uint8 bytes in ``(H, W, RGB)`` order (no compression; preferred for a server on
this machine, see :func:`is_loopback_host`).
"""

from __future__ import annotations

import base64
import io
import ipaddress
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from PIL import Image

from flow_grpo.rewards.images import to_uint8

__all__ = [
    "IMAGE_FORMATS",
    "PROTOCOL_VERSION",
    "decode_images",
    "encode_images",
    "images_to_uint8",
    "is_loopback_host",
]

PROTOCOL_VERSION = 1
"""Version of the JSON protocol; the server reports it on ``/health``."""

IMAGE_FORMATS = ("png", "raw")
"""Image encodings of a ``/score`` request."""


def images_to_uint8(images: torch.Tensor) -> np.ndarray:
    """Float ``(N, 3, H, W)`` in [0, 1] (rounded with `to_uint8`) or uint8 -> uint8 ``(N, H, W, 3)`` numpy."""
    return to_uint8(images).permute(0, 2, 3, 1).cpu().numpy()


def encode_images(images: torch.Tensor, image_format: str) -> dict[str, Any]:
    """Encode a batch for a ``/score`` request.

    Args:
        images: float ``(N, 3, H, W)`` in ``[0, 1]`` or uint8.
        image_format: ``"png"`` or ``"raw"``.

    Returns:
        ``{"image_format", "height", "width", "images": [base64 str] * N}``.
    """
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"image_format must be one of {IMAGE_FORMATS}, got {image_format!r}.")
    pixels = images_to_uint8(images)
    encoded = []
    for pixel_array in pixels:
        if image_format == "png":
            buffer = io.BytesIO()
            # Level 1: PNG is lossless at any level; higher levels only cost encoding time.
            Image.fromarray(pixel_array).save(buffer, format="PNG", compress_level=1)
            data = buffer.getvalue()
        else:
            data = np.ascontiguousarray(pixel_array).tobytes()
        encoded.append(base64.b64encode(data).decode("ascii"))
    return {
        "image_format": image_format,
        "height": int(images.shape[2]),
        "width": int(images.shape[3]),
        "images": encoded,
    }


def decode_images(payload: Mapping[str, Any], max_pixels: int = 4096 * 4096) -> torch.Tensor:
    """Decode the images of a ``/score`` request (the inverse of :func:`encode_images`).

    Args:
        payload: the request dict.
        max_pixels: largest accepted ``height * width`` (protects the server's memory).

    Returns:
        float32 ``(N, 3, H, W)`` in ``[0, 1]`` on the CPU.

    Raises:
        ValueError: on a missing field, bad base64, a non-PNG image or a size mismatch.
    """
    image_format = payload.get("image_format")
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"'image_format' must be one of {list(IMAGE_FORMATS)}, got {image_format!r}.")
    height, width = payload.get("height"), payload.get("width")
    for name, value in (("height", height), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"'{name}' must be a positive integer, got {value!r}.")
    if height * width > max_pixels:
        raise ValueError(f"Images of {height}x{width} exceed the server limit of {max_pixels} pixels.")
    images = payload.get("images")
    if not isinstance(images, list) or not images:
        raise ValueError("'images' must be a non-empty list of base64 strings.")
    arrays = []
    for i, item in enumerate(images):
        if not isinstance(item, str):
            raise ValueError(f"images[{i}] is not a base64 string.")
        try:
            data = base64.b64decode(item, validate=True)
        except (ValueError, TypeError) as error:
            raise ValueError(f"images[{i}] is not valid base64: {error}") from None
        if image_format == "raw":
            if len(data) != height * width * 3:
                raise ValueError(
                    f"images[{i}] has {len(data)} bytes; {height}x{width}x3 = {height * width * 3} expected."
                )
            arrays.append(np.frombuffer(data, dtype=np.uint8).reshape(height, width, 3))
        else:
            try:
                image = Image.open(io.BytesIO(data), formats=["PNG"])
            except Exception as error:  # PIL raises several types for undecodable data
                raise ValueError(f"images[{i}] is not a PNG image: {error}") from None
            if image.size != (width, height):
                raise ValueError(f"images[{i}] is {image.size[0]}x{image.size[1]} (WxH); {width}x{height} declared.")
            try:
                arrays.append(np.asarray(image.convert("RGB")))
            except Exception as error:
                raise ValueError(f"images[{i}] could not be decoded: {error}") from None
    batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    return batch.float().div_(255.0)


def is_loopback_host(host: str) -> bool:
    """True for "localhost" and loopback IP addresses (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
