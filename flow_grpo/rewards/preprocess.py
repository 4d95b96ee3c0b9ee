"""Batched on-device image preprocessing for CLIP-style reward models.

Reward models ship a processor that works one PIL image at a time on the CPU. Generated images are
already a float batch on the accelerator, so :class:`ImagePreprocess` does the same steps as the
model's processor on the whole batch where it lies:

1. round to uint8, as the processors receive 8-bit images;
2. resize (shortest edge to ``S`` keeping the aspect ratio, or to a fixed ``(H, W)``) with an
   antialiased bicubic or bilinear filter on the uint8 batch (torchvision, which is what the
   transformers CLIP processor runs; PIL's filter is the same up to rounding);
3. centre crop;
4. normalise with the model's mean and std.

The result equals the transformers processor's output to float precision and PIL-based processors
(open_clip, the PIL backend of transformers) up to one grey level; tests compare them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from flow_grpo.rewards.images import to_uint8, to_unit_float

__all__ = ["ImagePreprocess"]

# PIL resampling codes as stored in processor configs.
_PIL_FILTERS = {2: "bilinear", 3: "bicubic"}


@dataclass(frozen=True)
class ImagePreprocess:
    """On-device equivalent of a CLIP image processor.

    Attributes:
        shortest_edge: resize so the shorter side has this many pixels (aspect ratio kept); 0 = use
            ``size`` instead.
        size: ``(height, width)`` to resize to when ``shortest_edge`` is 0; ``None`` = no resize.
        crop: ``(height, width)`` of the centre crop; ``None`` = no crop.
        mean: per-channel mean subtracted after scaling to [0, 1].
        std: per-channel std divided by.
        interpolation: ``"bicubic"`` or ``"bilinear"`` (both antialiased).
        quantize: work on uint8 pixels as the processors do (else resize in float, skipping the
            rounding; differs from the processors by up to one grey level).
        crop_offset: how the crop's top-left offset ``(size - crop) / 2`` is rounded: ``"floor"``
            (transformers) or ``"round"`` (torchvision's ``CenterCrop``, used by open_clip).
    """

    shortest_edge: int
    size: tuple[int, int] | None
    crop: tuple[int, int] | None
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    quantize: bool = True
    crop_offset: str = "floor"

    def __post_init__(self) -> None:
        if self.interpolation not in ("bicubic", "bilinear"):
            raise ValueError(f"interpolation must be 'bicubic' or 'bilinear', got {self.interpolation!r}.")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError(f"mean and std need 3 values (RGB), got {self.mean} and {self.std}.")
        if self.crop_offset not in ("floor", "round"):
            raise ValueError(f"crop_offset must be 'floor' or 'round', got {self.crop_offset!r}.")

    @property
    def output_size(self) -> tuple[int, int] | None:
        """``(height, width)`` of the output when it does not depend on the input, else ``None``."""
        if self.crop is not None:
            return self.crop
        if not self.shortest_edge and self.size is not None:
            return self.size
        return None

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """Size after the resize step for an input of ``height x width`` (processor rounding)."""
        if self.shortest_edge:
            short, long = (height, width) if height <= width else (width, height)
            new_short, new_long = self.shortest_edge, int(self.shortest_edge * long / short)
            return (new_short, new_long) if height <= width else (new_long, new_short)
        if self.size is not None:
            return self.size
        return height, width

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Preprocess a batch.

        Args:
            images: float ``(N, 3, H, W)`` in ``[0, 1]`` (values outside are clamped) or uint8 in
                ``0..255``, on any device; float images are first rounded to uint8 (`to_uint8`).

        Returns:
            float32 ``(N, 3, h, w)`` on the same device, normalised.
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"Expected images of shape (N, 3, H, W), got {tuple(images.shape)}.")
        height, width = images.shape[-2:]
        new_size = self.resized_size(height, width)
        if self.quantize:
            # 8-bit path, as the processors work: torchvision's antialiased uint8 resize is also
            # several times faster on CPU than a float resize. One copy, then in-place passes.
            pixels = to_uint8(images)
            if new_size != (height, width):
                pixels = _resize_uint8(pixels, new_size, self.interpolation)
            if self.crop is not None:
                pixels = _center_crop(pixels, self.crop, self.crop_offset)
            x = pixels.float().div_(255.0)
        else:
            x = to_unit_float(images).float().nan_to_num(0.0).clamp_(0.0, 1.0)
            if new_size != (height, width):
                x = F.interpolate(x, size=new_size, mode=self.interpolation, align_corners=False, antialias=True)
                x = x.clamp_(0.0, 1.0)  # as an 8-bit image cannot overshoot
            if self.crop is not None:
                x = _center_crop(x, self.crop, self.crop_offset)
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        return x.sub_(mean).div_(std)

    @classmethod
    def from_clip_image_processor(cls, processor: Any) -> ImagePreprocess:
        """Read the settings of a transformers CLIP image processor (or a processor holding one).

        Raises:
            ValueError: for settings this batched path does not reproduce (e.g. no rescaling).
        """
        image_processor = getattr(processor, "image_processor", processor)

        def get(name: str, default: Any = None) -> Any:
            return getattr(image_processor, name, default)

        if not get("do_rescale", True) or abs(float(get("rescale_factor", 1 / 255)) - 1 / 255) > 1e-9:
            raise ValueError("Only image processors that rescale by 1/255 are supported.")
        resample = get("resample", 3)
        resample = int(getattr(resample, "value", resample))
        if resample not in _PIL_FILTERS:
            raise ValueError(
                f"Unsupported resampling filter {resample} in the image processor; "
                f"supported PIL codes: {sorted(_PIL_FILTERS)} (bilinear, bicubic)."
            )
        shortest_edge, size = 0, None
        if get("do_resize", True):
            resize = _size_dict(get("size"))
            if resize.get("shortest_edge"):
                if resize.get("longest_edge"):
                    raise ValueError("Image processors with both shortest_edge and longest_edge are not supported.")
                shortest_edge = int(resize["shortest_edge"])
            elif resize.get("height") and resize.get("width"):
                size = (int(resize["height"]), int(resize["width"]))
            else:
                raise ValueError(f"Unsupported resize setting {resize} in the image processor.")
        crop = None
        if get("do_center_crop", False):
            crop_size = _size_dict(get("crop_size"))
            crop = (int(crop_size["height"]), int(crop_size["width"]))
        if get("do_normalize", True):
            mean, std = _triple(get("image_mean")), _triple(get("image_std"))
        else:
            mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
        return cls(shortest_edge, size, crop, mean, std, _PIL_FILTERS[resample])

    @classmethod
    def from_open_clip(cls, preprocess_cfg: Mapping[str, Any]) -> ImagePreprocess:
        """Read an open_clip ``model.visual.preprocess_cfg`` (the evaluation transform).

        open_clip's eval transform resizes the shortest edge to the model's image size and centre
        crops (``resize_mode="shortest"``), or resizes straight to the size (``"squash"``).
        """
        image_size = preprocess_cfg.get("size", 224)
        height, width = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        interpolation = preprocess_cfg.get("interpolation", "bicubic")
        if interpolation not in ("bicubic", "bilinear"):
            raise ValueError(f"Unsupported open_clip interpolation {interpolation!r}; use bicubic or bilinear.")
        mode = preprocess_cfg.get("resize_mode", "shortest")
        mean, std = _triple(preprocess_cfg["mean"]), _triple(preprocess_cfg["std"])
        if mode == "shortest":
            if height != width:
                raise ValueError("resize_mode='shortest' needs a square model image size.")
            return cls(height, None, (height, width), mean, std, interpolation, crop_offset="round")
        if mode == "squash":
            return cls(0, (height, width), None, mean, std, interpolation)
        raise ValueError(f"Unsupported open_clip resize_mode {mode!r}; supported: 'shortest', 'squash'.")


def _resize_uint8(pixels: torch.Tensor, size: tuple[int, int], interpolation: str) -> torch.Tensor:
    """Antialiased resize of uint8 ``(N, C, H, W)`` with torchvision (rounds back to uint8)."""
    from torchvision.transforms.v2 import functional as tvF

    mode = tvF.InterpolationMode.BICUBIC if interpolation == "bicubic" else tvF.InterpolationMode.BILINEAR
    return tvF.resize(pixels, list(size), interpolation=mode, antialias=True)


def _center_crop(x: torch.Tensor, crop: tuple[int, int], offset: str) -> torch.Tensor:
    """Centre crop ``(N, C, H, W)`` to ``crop``, zero-padding sides that are too small."""
    crop_h, crop_w = crop
    height, width = x.shape[-2:]
    if crop_h > height or crop_w > width:
        pad_h, pad_w = max(crop_h - height, 0), max(crop_w - width, 0)
        x = F.pad(x, (pad_w // 2, (pad_w + 1) // 2, pad_h // 2, (pad_h + 1) // 2))
        height, width = x.shape[-2:]
    rounding = round if offset == "round" else int
    top, left = int(rounding((height - crop_h) / 2.0)), int(rounding((width - crop_w) / 2.0))
    return x[..., top : top + crop_h, left : left + crop_w]


def _size_dict(size: Any) -> dict[str, Any]:
    if size is None:
        raise ValueError("The image processor has no size setting.")
    if isinstance(size, int):
        return {"shortest_edge": size}
    if isinstance(size, Mapping):
        return dict(size)
    # transformers 5 SizeDict
    return {key: getattr(size, key, None) for key in ("shortest_edge", "longest_edge", "height", "width")}


def _triple(values: Sequence[float] | float) -> tuple[float, float, float]:
    if isinstance(values, (int, float)):
        return (float(values),) * 3
    values = tuple(float(v) for v in values)
    if len(values) != 3:
        raise ValueError(f"Expected 3 channel values, got {values}.")
    return values  # type: ignore[return-value]
