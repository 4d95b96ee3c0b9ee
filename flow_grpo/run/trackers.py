"""Experiment trackers: their init arguments, and image logging (`config_checks` checks `config.report_to`).

Any tracker accelerate supports can be named when its package is installed (`wandb`, `tensorboard`,
`mlflow`, `comet_ml`, `aim`, ...); `"none"` logs only to the run directory. wandb reads its entity,
group, tags and notes from `config.wandb`.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Sequence

import ml_collections
import numpy as np
import torch
from accelerate import Accelerator
from PIL import Image

from flow_grpo.run import pictures
from flow_grpo.algorithm.turning_points import StepRewards

__all__ = [
    "epoch_line",
    "init_kwargs",
    "log_eval_samples",
    "log_histograms",
    "log_image",
    "progress_line",
    "reward_curves_image",
    "tracker_config",
]


def init_kwargs(config: ml_collections.ConfigDict, run_name: str, run_dir: str) -> dict[str, dict]:
    """`init_kwargs` of `Accelerator.init_trackers`: wandb's name, directory, entity, group, tags and notes."""
    wandb = config.wandb
    options = {"name": run_name, "dir": os.path.abspath(run_dir)}
    options.update({key: wandb[key] for key in ("entity", "group", "notes") if wandb[key]})
    if wandb.tags:
        options["tags"] = list(wandb.tags)
    return {"wandb": options}


def log_image(accelerator: Accelerator, report_to: str, name: str, image: Image.Image, step: int, caption: str | None = None) -> None:
    """Send one PIL image to the active tracker (wandb or tensorboard; other trackers get none)."""
    if report_to == "wandb":
        import wandb

        accelerator.get_tracker("wandb", unwrap=True).log({name: wandb.Image(image, caption=caption)}, step=step)
    elif report_to == "tensorboard":
        accelerator.get_tracker("tensorboard").log_images({name: np.asarray(image)}, step=step, dataformats="HWC")


def log_eval_samples(
    accelerator: Accelerator, report_to: str, images: torch.Tensor, prompts: Sequence[str], scores: Sequence[float], step: int
) -> None:
    """wandb: one `wandb.Image` per eval sample, captioned with its prompt and score (images (N, 3, H, W) in [0, 1])."""
    if report_to != "wandb":
        return
    import wandb

    pixels = (images.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    samples = [wandb.Image(pixel, caption=f"{prompt} | {score:.4f}") for pixel, prompt, score in zip(pixels, prompts, scores)]
    accelerator.get_tracker("wandb", unwrap=True).log({"eval_samples": samples}, step=step)


def log_histograms(accelerator: Accelerator, report_to: str, values: dict[str, torch.Tensor], step: int) -> None:
    """Histograms of named tensors (e.g. `tp/d_j`, `tp/g_j`) in wandb or tensorboard."""
    if report_to == "wandb":
        import wandb

        histograms = {name: wandb.Histogram(value.detach().float().cpu().flatten().numpy()) for name, value in values.items()}
        accelerator.get_tracker("wandb", unwrap=True).log(histograms, step=step)
    elif report_to == "tensorboard":
        writer = accelerator.get_tracker("tensorboard", unwrap=True)
        for name, value in values.items():
            writer.add_histogram(name, value.detach().float().cpu().flatten().numpy(), global_step=step)


def reward_curves_image(completed: torch.Tensor, steps: StepRewards, epoch: int, count: int) -> Image.Image:
    """The TP diagnostic plot of up to `count` trajectories of an epoch, trajectories with turning points first.

    Args:
        completed: (B, W+1) completed rewards `R_0 ... R_W`.
        steps: `step_rewards` of `completed` (candidates and kept turning points, (B, W)).
    """
    shown = pictures.trajectories_to_show(steps.candidates, steps.turning_points, count)
    labels = [f"trajectory {int(index)}" for index in shown]
    return pictures.reward_curves_plot(
        completed[shown], steps.candidates[shown], kept=steps.turning_points[shown], epoch=epoch, labels=labels
    )


def progress_line(epoch: int, first_epoch: int, num_epochs: int, elapsed: float) -> str:
    """`progress: epoch N/total | elapsed H:MM:SS | ETA H:MM:SS` after finishing `epoch` (0-based).

    The ETA extrapolates the mean duration of the epochs run since `first_epoch` (this run or resume).
    """
    done = epoch - first_epoch + 1
    remaining = elapsed / done * (num_epochs - epoch - 1)
    clock = lambda seconds: str(datetime.timedelta(seconds=round(seconds)))  # noqa: E731
    return f"progress: epoch {epoch + 1}/{num_epochs} | elapsed {clock(elapsed)} | ETA {clock(remaining)}"


def tracker_config(config: ml_collections.ConfigDict) -> dict:
    """The config as the tracker stores it: nested for wandb; flat `a.b` keys with scalar values for the others
    (tensorboard's hparams accept only int, float, str and bool).
    """
    if config.report_to == "wandb":
        return config.to_dict()
    flat: dict[str, int | float | str | bool] = {}

    def visit(value: object, prefix: str) -> None:
        if isinstance(value, dict):
            for key, child in value.items():
                visit(child, f"{prefix}{key}.")
        else:
            flat[prefix.rstrip(".")] = value if isinstance(value, (int, float, str, bool)) else str(value)

    visit(config.to_dict(), "")
    return flat


def epoch_line(metrics: dict[str, float], tp: bool) -> str:
    """The one-line log summary of an epoch's `metrics` (TP-GRPO adds R_0, turning points and mean d_j)."""
    parts = [f"epoch {int(metrics['epoch'])}", f"reward {metrics['reward/avg']:.4f}"]
    if tp:
        parts.append(f"R0 {metrics['reward/baseline_R0']:.4f}")
        parts.append(
            f"turning points {metrics['tp/tp_rate']:.3f} "
            f"(+{int(metrics['tp/tp_pos_after'])}/-{int(metrics['tp/tp_neg_after'])} kept of "
            f"+{int(metrics['tp/tp_pos_before'])}/-{int(metrics['tp/tp_neg_before'])})"
        )
        parts.append(f"mean d_j {metrics['tp/mean_incremental']:+.4f}")
    if "train/kl" in metrics:
        parts.append(f"kl {metrics['train/kl']:.2e}")
        parts.append(f"clip {metrics['train/clip_fraction']:.2f}")
        parts.append(f"kept {metrics['train/kept_fraction']:.2f}")
    else:
        parts.append("training skipped")
    if "eval/avg" in metrics:
        parts.append(f"eval {metrics['eval/avg']:.4f}")
    parts.append(f"{metrics['time/epoch']:.1f}s")
    return " | ".join(parts)
