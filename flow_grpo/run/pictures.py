"""Pictures for the run directory and the tracker: eval image grids and completed-reward curves.

Both are drawn with matplotlib on its Agg canvas (no display, no pyplot state, so the global
backend of a notebook or script is left alone). The `*_figure` functions return the matplotlib
figure (the tests inspect its axes, labels and markers); `image_grid` and `reward_curves_plot`
render it to a PIL image, which is what the run directory and wandb receive.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence

import matplotlib
import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

__all__ = [
    "KEPT_LABEL",
    "DROPPED_LABEL",
    "figure_to_image",
    "image_grid",
    "image_grid_figure",
    "reward_curves_figure",
    "reward_curves_plot",
    "shorten_prompt",
    "trajectories_to_show",
]

KEPT_LABEL = "turning point (kept)"
DROPPED_LABEL = "turning point (dropped by balancing)"


def _new_figure(width: float, height: float, dpi: int = 100) -> Figure:
    """A figure (size in inches) attached to its own Agg canvas."""
    figure = Figure(figsize=(width, height), dpi=dpi)
    FigureCanvasAgg(figure)
    return figure


def figure_to_image(figure: Figure) -> Image.Image:
    """Render a matplotlib figure to an RGB PIL image."""
    canvas = figure.canvas if isinstance(figure.canvas, FigureCanvasAgg) else FigureCanvasAgg(figure)
    canvas.draw()
    return Image.fromarray(np.asarray(canvas.buffer_rgba())).convert("RGB")


def shorten_prompt(prompt: str, width: int = 32, lines: int = 2) -> str:
    """`prompt` wrapped to at most `lines` lines of `width` characters, ending in "..." when cut."""
    return textwrap.fill(" ".join(prompt.split()), width=width, max_lines=lines, placeholder="...")


def image_grid_figure(
    images: torch.Tensor,
    columns: int = 4,
    prompts: Sequence[str] | None = None,
    scores: Sequence[float] | None = None,
) -> Figure:
    """Eval images as a matplotlib figure, one tile per image titled with its prompt and score.

    Args:
        images: (N, 3, H, W) in [0, 1].
        columns: tiles per row.
        prompts: N prompts (shortened to two lines), or None for untitled tiles.
        scores: N scores shown under the prompt, or None.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must have shape (N, 3, H, W), got {tuple(images.shape)}")
    count = images.shape[0]
    for name, values in (("prompts", prompts), ("scores", scores)):
        if values is not None and len(values) != count:
            raise ValueError(f"{name} has {len(values)} entries for {count} images; pass one per image")
    columns = max(1, min(columns, count))
    rows = -(-count // columns)
    titled = prompts is not None or scores is not None
    tile = 2.6
    figure = _new_figure(tile * columns, (tile + (0.55 if titled else 0.0)) * rows)
    axes = figure.subplots(rows, columns, squeeze=False)
    pixels = images.detach().float().cpu().clamp(0, 1).permute(0, 2, 3, 1).numpy()  # (N, H, W, 3)
    for index, axis in enumerate(axes.flat):
        axis.set_axis_off()
        if index >= count:
            continue
        axis.imshow(pixels[index])
        parts = []
        if prompts is not None:
            parts.append(shorten_prompt(prompts[index]))
        if scores is not None:
            parts.append(f"score {scores[index]:.4g}")
        if parts:
            axis.set_title("\n".join(parts), fontsize=8)
    figure.tight_layout(pad=0.4)
    return figure


def image_grid(
    images: torch.Tensor,
    columns: int = 4,
    prompts: Sequence[str] | None = None,
    scores: Sequence[float] | None = None,
) -> Image.Image:
    """Images (N, 3, H, W) in [0, 1] as one PIL grid image; tiles titled as in `image_grid_figure`."""
    return figure_to_image(image_grid_figure(images, columns, prompts, scores))


def trajectories_to_show(candidates: torch.Tensor, kept: torch.Tensor | None = None, count: int = 6) -> torch.Tensor:
    """Indices of up to `count` trajectories worth plotting, in batch order.

    Trajectories with a dropped turning point come first, then those with a kept one, then the rest,
    so one plot shows both marker kinds whenever the batch has them.

    Args:
        candidates: (B, W) bool, turning points before balancing.
        kept: (B, W) bool, turning points after balancing; None means all candidates were kept.
    """
    candidates = candidates.detach().cpu().bool()
    kept = candidates if kept is None else kept.detach().cpu().bool()
    dropped = (candidates & ~kept).any(dim=1)
    has_kept = kept.any(dim=1)
    priority = dropped.long() * 2 + has_kept.long()  # (B,)
    order = torch.sort(-priority, stable=True).indices[:count]
    return torch.sort(order).values


def reward_curves_figure(
    completed_rewards: torch.Tensor,
    turning_points: torch.Tensor,
    kept: torch.Tensor | None = None,
    epoch: int | None = None,
    labels: Sequence[str] | None = None,
) -> Figure:
    """Plot `R_0 ... R_W` of a few trajectories against the window step, turning points marked.

    The x axis counts the SDE steps of the window taken before the ODE completion (0 ... W); the
    window step `j` is the segment from `R_j` to `R_{j+1}`, and a turning point at step `j` is marked
    on the middle of that segment: a filled star when balancing kept it, an open cross when
    balancing dropped it (the step then gets its incremental reward `d_j`).

    Args:
        completed_rewards: (K, W+1) completed rewards of K trajectories.
        turning_points: (K, W) bool, turning points before balancing (the candidates).
        kept: (K, W) bool, turning points after balancing (a subset of `turning_points`); None
            marks every turning point as kept.
        epoch: shown in the title when given.
        labels: K legend names of the trajectories (default "trajectory k").
    """
    rewards = completed_rewards.detach().float().cpu()
    candidates = turning_points.detach().cpu().bool()
    kept = candidates if kept is None else kept.detach().cpu().bool()
    if rewards.ndim != 2 or rewards.shape[1] < 2:
        raise ValueError(f"completed_rewards must have shape (K, W+1) with W >= 1, got {tuple(rewards.shape)}")
    expected = (rewards.shape[0], rewards.shape[1] - 1)
    for name, mask in (("turning_points", candidates), ("kept", kept)):
        if tuple(mask.shape) != expected:
            raise ValueError(f"{name} must have shape {expected} (K, W) to match completed_rewards, got {tuple(mask.shape)}")
    if labels is not None and len(labels) != rewards.shape[0]:
        raise ValueError(f"labels has {len(labels)} entries for {rewards.shape[0]} trajectories; pass one per trajectory")
    if (kept & ~candidates).any():
        raise ValueError("kept marks a step that is not in turning_points; pass the candidates before balancing as turning_points")

    window = rewards.shape[1] - 1
    steps = np.arange(window + 1)
    colours = matplotlib.colormaps["tab10"].colors
    figure = _new_figure(8.0, 4.4, dpi=120)
    axis = figure.subplots()
    for k in range(rewards.shape[0]):
        colour = colours[k % len(colours)]
        curve = rewards[k].numpy()
        trend = curve[-1] - curve[0]
        axis.plot(steps, curve, marker="o", markersize=3.5, linewidth=1.6, color=colour, label=f"{labels[k] if labels is not None else f'trajectory {k}'} (Δ = {trend:+.3g})")
        for j in range(window):
            if not candidates[k, j]:
                continue
            x, y = j + 0.5, 0.5 * (curve[j] + curve[j + 1])
            if kept[k, j]:
                axis.plot(x, y, linestyle="none", marker="*", markersize=15, color=colour, markeredgecolor="black", markeredgewidth=0.7, zorder=3, gid="kept")
            else:
                axis.plot(x, y, linestyle="none", marker="X", markersize=10, markerfacecolor="white", markeredgecolor=colour, markeredgewidth=1.6, zorder=3, gid="dropped")
    # Legend entries for the two marker kinds, drawn once whatever the data holds.
    axis.plot([], [], linestyle="none", marker="*", markersize=12, color="grey", markeredgecolor="black", markeredgewidth=0.7, label=KEPT_LABEL)
    axis.plot([], [], linestyle="none", marker="X", markersize=9, markerfacecolor="white", markeredgecolor="grey", markeredgewidth=1.6, label=DROPPED_LABEL)
    axis.set_xticks(steps)
    axis.set_xlim(-0.25, window + 0.25)
    axis.set_xlabel("window step (SDE steps taken before the ODE completion)")
    axis.set_ylabel("reward of the completed image")
    title = f"Completed rewards $R_0 \\ldots R_{{{window}}}$"
    axis.set_title(f"{title}, epoch {epoch}" if epoch is not None else title)
    axis.grid(True, alpha=0.3)
    axis.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    figure.tight_layout()
    return figure


def reward_curves_plot(
    completed_rewards: torch.Tensor,
    turning_points: torch.Tensor,
    kept: torch.Tensor | None = None,
    epoch: int | None = None,
    labels: Sequence[str] | None = None,
) -> Image.Image:
    """`reward_curves_figure` rendered to a PIL image (same arguments)."""
    return figure_to_image(reward_curves_figure(completed_rewards, turning_points, kept, epoch, labels))
