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
    "DECODED_BYTES_PER_PIXEL",
    "IMAGE_FORMATS",
    "ImageBudgetError",
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


class ImageBudgetError(ValueError):
    """The images of a request would decode to more pixels than the server accepts (HTTP 413)."""


DECODED_BYTES_PER_PIXEL = 15
"""Peak bytes :func:`decode_images` holds per pixel of its budget: the uint8 batch (3), then its float32 copy (12).

The decoding of one PNG (at most 11 bytes per pixel of that image, while the uint8 batch exists) stays below it.
"""

_PNG_MODES = frozenset({"RGB", "RGBA", "L", "LA", "P"})
"""PIL modes of 8-bit PNGs; other modes (16-bit grey, ...) are refused before decoding."""


def decode_images(payload: Mapping[str, Any], max_pixels: int = 4096 * 4096) -> torch.Tensor:
    """Decode the images of a ``/score`` request (the inverse of :func:`encode_images`).

    Every field is checked before a pixel is decoded: the format, the declared size, the number of
    images times the declared size against ``max_pixels``, and each PNG's width and height from its
    header. So the decoded images take at most ``DECODED_BYTES_PER_PIXEL * max_pixels`` bytes, whatever
    the PNGs claim to hold.

    Args:
        payload: the request dict.
        max_pixels: most pixels of all images together (``N * height * width``).

    Returns:
        float32 ``(N, 3, H, W)`` in ``[0, 1]`` on the CPU.

    Raises:
        ImageBudgetError: the images would decode to more than ``max_pixels`` pixels.
        ValueError: on a missing field, bad base64, a non-PNG image or a size mismatch.
    """
    image_format = payload.get("image_format")
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"'image_format' must be one of {list(IMAGE_FORMATS)}, got {image_format!r}.")
    height, width = payload.get("height"), payload.get("width")
    for name, value in (("height", height), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"'{name}' must be a positive integer, got {value!r}.")
    images = payload.get("images")
    if not isinstance(images, list) or not images:
        raise ValueError("'images' must be a non-empty list of base64 strings.")
    if len(images) * height * width > max_pixels:
        raise ImageBudgetError(
            f"{len(images)} images of {height}x{width} are {len(images) * height * width} pixels, over the "
            f"server's max_pixels = {max_pixels} per request."
        )
    pixels = np.empty((len(images), height, width, 3), dtype=np.uint8)
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
            pixels[i] = np.frombuffer(data, dtype=np.uint8).reshape(height, width, 3)
        else:
            _decode_png(data, f"images[{i}]", pixels[i])
        del data
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float().div_(255.0)


def _decode_png(data: bytes, label: str, out: np.ndarray) -> None:
    """Decode one PNG into ``out`` (uint8 ``(H, W, 3)``) once its header shows the declared size."""
    height, width = out.shape[:2]
    try:
        image = Image.open(io.BytesIO(data), formats=["PNG"])
    except Exception as error:  # PIL raises several types for undecodable data
        raise ValueError(f"{label} is not a PNG image: {error}") from None
    # Image.open reads the header only: the size and mode are known before a pixel is decoded.
    if image.size != (width, height):
        raise ValueError(f"{label} is {image.size[0]}x{image.size[1]} (WxH); {width}x{height} declared.")
    if image.mode not in _PNG_MODES:
        raise ValueError(f"{label} is a PNG of mode {image.mode!r}; send 8-bit RGB images.")
    try:
        out[...] = np.asarray(image if image.mode == "RGB" else image.convert("RGB"))
    except Exception as error:
        raise ValueError(f"{label} could not be decoded: {error}") from None


def is_loopback_host(host: str) -> bool:
    """True for "localhost" and loopback IP addresses (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
