"""Human-preference rewards scored with their authors' packages: ``imagereward`` and ``hpsv3``.

Both packages are optional and imported only when the reward is built. ``image-reward`` is the
``paper`` extra (``pip install ".[paper]"``). ``hpsv3`` 1.0 pins transformers 4.45 and diffusers 0.39,
older than this project needs, so it cannot share the training environment: install it in an
environment of its own and score there (e.g. a reward server in that environment hosting ``hpsv3``).

- ``imagereward``: ImageReward (Xu et al., 2023), the ``image-reward`` package (module
  ``ImageReward``): ``ImageReward.load(model, device=...)`` and ``model.score(prompt, image)`` per
  image. Options: ``model`` (default ``"ImageReward-v1.0"``, a name or a checkpoint path).
- ``hpsv3``: HPSv3 (Ma et al., 2025; Qwen2-VL-7B with a preference head), the ``hpsv3`` package:
  ``HPSv3RewardInferencer(device=..., checkpoint_path=...)`` and ``inferencer.reward(prompts=...,
  image_paths=[PIL images])``, whose column 0 is the score (the mean ``mu`` of its preference
  distribution). Options: ``checkpoint_path`` (default ``""``: the package's own download),
  ``batch_size`` (images per call, 8).

Both score the 8-bit images (as PIL images, like their packages' own examples) and return float32 ``(N,)``.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from flow_grpo.rewards.options import chunk_slices, parse_options
from flow_grpo.rewards.registry import RewardFn, register_reward
from flow_grpo.rewards.transport import images_to_uint8

__all__ = ["HPSV3_DEFAULTS", "IMAGEREWARD_DEFAULTS", "make_hpsv3", "make_imagereward"]

IMAGEREWARD_DEFAULTS: dict[str, Any] = {"model": "ImageReward-v1.0"}
"""Options of ``imagereward``."""
HPSV3_DEFAULTS: dict[str, Any] = {"checkpoint_path": "", "batch_size": 8}
"""Options of ``hpsv3``."""


def _import(module: str, package: str, reward: str, hint: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(f"the {reward} reward needs the {package!r} package ({error}); {hint}") from None


def _pil_images(images: torch.Tensor) -> list[Image.Image]:
    """``(N, 3, H, W)`` float in [0, 1] or uint8 -> N RGB PIL images."""
    return [Image.fromarray(pixels) for pixels in images_to_uint8(images)]


@register_reward("imagereward")
def make_imagereward(device: torch.device, options: Mapping[str, Any]) -> RewardFn:
    """ImageReward with the ``image-reward`` package (module docstring)."""
    settings = parse_options("imagereward", options, IMAGEREWARD_DEFAULTS)
    package = _import("ImageReward", "image-reward", "imagereward", 'install it with `pip install ".[paper]"`')
    model = package.load(settings["model"], device=str(device))

    @torch.no_grad()
    def score(images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]) -> torch.Tensor:
        values = [float(np.ravel(model.score(prompt, image))[0]) for prompt, image in zip(prompts, _pil_images(images))]
        return torch.tensor(values, dtype=torch.float32)

    return score


@register_reward("hpsv3")
def make_hpsv3(device: torch.device, options: Mapping[str, Any]) -> RewardFn:
    """HPSv3 with the ``hpsv3`` package (module docstring)."""
    settings = parse_options("hpsv3", options, HPSV3_DEFAULTS)
    if settings["batch_size"] < 1:
        raise ValueError(f"reward_options.hpsv3.batch_size must be positive, got {settings['batch_size']}")
    package = _import(
        "hpsv3", "hpsv3", "hpsv3", "`pip install hpsv3` in an environment of its own (it pins transformers 4.45)"
    )
    extra = {"checkpoint_path": settings["checkpoint_path"]} if settings["checkpoint_path"] else {}
    inferencer = package.HPSv3RewardInferencer(device=str(device), **extra)

    @torch.no_grad()
    def score(images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]) -> torch.Tensor:
        pil = _pil_images(images)
        values = []
        for part in chunk_slices(len(pil), settings["batch_size"]):
            rewards = inferencer.reward(prompts=list(prompts[part]), image_paths=pil[part])
            values.append(torch.as_tensor(rewards).float().reshape(len(pil[part]), -1)[:, 0].cpu())
        return torch.cat(values)

    return score
