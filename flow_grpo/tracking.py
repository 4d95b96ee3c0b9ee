"""Pictures for the run directory and the tracker: eval image grids and completed-reward curves."""

from __future__ import annotations

import torch
from PIL import Image, ImageDraw
from torchvision.utils import make_grid
from torchvision.transforms.functional import to_pil_image

CURVE_COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]


def image_grid(images: torch.Tensor, columns: int = 4) -> Image.Image:
    """Images (N, 3, H, W) in [0, 1] as one PIL grid image."""
    return to_pil_image(make_grid(images.detach().float().cpu().clamp(0, 1), nrow=columns, padding=2))


def reward_curves_plot(
    completed_rewards: torch.Tensor, turning_points: torch.Tensor, size: tuple[int, int] = (480, 320)
) -> Image.Image:
    """Plot `R_0 ... R_W` of a few trajectories, with turning points marked.

    Args:
        completed_rewards: (K, W+1) rewards of K trajectories.
        turning_points: (K, W) bool; a turning point at window step j is drawn as a ring on the
            segment start `R_j` (the reward before the step whose reward was aggregated).
    """
    rewards = completed_rewards.detach().float().cpu()
    marks = turning_points.detach().cpu()
    width, height = size
    margin = 30
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    draw.rectangle([margin, margin // 2, width - margin // 2, height - margin], outline=(160, 160, 160))
    low, high = float(rewards.min()), float(rewards.max())
    span = high - low or 1.0
    steps = rewards.shape[1] - 1

    def point(j: int, value: float) -> tuple[float, float]:
        x = margin + j / max(steps, 1) * (width - 1.5 * margin)
        y = height - margin - (value - low) / span * (height - 1.5 * margin)
        return x, y

    for k in range(rewards.shape[0]):
        colour = CURVE_COLOURS[k % len(CURVE_COLOURS)]
        points = [point(j, float(rewards[k, j])) for j in range(steps + 1)]
        draw.line(points, fill=colour, width=2)
        for j in range(steps):
            if marks[k, j]:
                x, y = points[j]
                draw.ellipse([x - 5, y - 5, x + 5, y + 5], outline=colour, width=2)
    draw.text((margin, height - margin + 8), f"R_0 ... R_{steps}   [{low:.4g}, {high:.4g}]   rings: turning points", fill=(0, 0, 0))
    return image
