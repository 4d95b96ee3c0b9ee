"""Clipped GRPO policy loss, KL to the LoRA-disabled reference, and diagnostics.

Implements the per-step objective of docs/algorithm.md, Flow-GRPO: advantages and loss:
``L = mean_i max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)) + beta * KL``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["LossOutput", "kl_to_reference", "grpo_loss"]


@dataclass(frozen=True)
class LossOutput:
    """Loss of one training step; every field is a 0-d tensor.

    Attributes:
        loss: ``policy_loss + beta * kl``, carries the gradient.
        policy_loss: clipped surrogate loss, mean over the batch.
        kl: mean KL to the reference (0 when ``beta == 0`` or no reference is given).
        approx_kl: ``0.5 * mean((log_prob - old_log_prob)^2)``, detached.
        clip_fraction: fraction of samples with ``|ratio - 1| > clip_range``, detached.
        ratio_mean: mean probability ratio, detached.
    """

    loss: torch.Tensor
    policy_loss: torch.Tensor
    kl: torch.Tensor
    approx_kl: torch.Tensor
    clip_fraction: torch.Tensor
    ratio_mean: torch.Tensor


def kl_to_reference(
    mean: torch.Tensor, reference_mean: torch.Tensor, std: torch.Tensor
) -> torch.Tensor:
    """KL between two Gaussians with the same per-sample std, per sample.

    ``KL_i = mean_dims((mean_i - reference_mean_i)^2) / (2 * std_i^2)``. The reference is
    treated as a constant (detached); the arithmetic runs in at least float32.

    Args:
        mean: (B, ...) step mean of the trained policy.
        reference_mean: (B, ...) step mean of the reference policy, same shape as ``mean``.
        std: (B,) per-sample step std (must be positive).

    Returns:
        (B,) per-sample KL.

    Raises:
        ValueError: on mismatched shapes.
    """
    if mean.shape != reference_mean.shape:
        raise ValueError(
            f"mean and reference_mean must have the same shape, got {tuple(mean.shape)} "
            f"and {tuple(reference_mean.shape)}"
        )
    if mean.dim() < 1:
        raise ValueError("mean must have a batch dimension")
    batch = mean.shape[0]
    if std.shape != (batch,):
        raise ValueError(f"std must have shape ({batch},), got {tuple(std.shape)}")
    dtype = torch.promote_types(mean.dtype, torch.float32)
    difference = mean.to(dtype) - reference_mean.detach().to(dtype)
    squared = difference.square().reshape(batch, -1).mean(dim=1)  # (B,)
    return squared / (2.0 * std.detach().to(dtype).square())


def grpo_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    *,
    clip_range: float,
    beta: float = 0.0,
    mean: torch.Tensor | None = None,
    reference_mean: torch.Tensor | None = None,
    std: torch.Tensor | None = None,
) -> LossOutput:
    """Clipped GRPO loss of one window step.

    ``ratio = exp(log_prob - old_log_prob)``; per sample
    ``max(-A * ratio, -A * clip(ratio, 1 - clip_range, 1 + clip_range))``, averaged over the
    batch. When ``beta > 0``, ``beta * mean_i kl_to_reference(mean, reference_mean, std)`` is
    added. ``old_log_prob`` and ``advantages`` are constants (detached).

    Args:
        log_prob: (B,) log-probabilities of the sampled steps under the current policy.
        old_log_prob: (B,) log-probabilities recorded during the rollout.
        advantages: (B,) advantages of this step.
        clip_range: ``eps`` of the ratio clip.
        beta: KL coefficient.
        mean: (B, ...) current step mean, needed when ``beta > 0``.
        reference_mean: (B, ...) reference step mean, needed when ``beta > 0``.
        std: (B,) step std, needed when ``beta > 0``.

    Returns:
        LossOutput of 0-d tensors.

    Raises:
        ValueError: on mismatched shapes, or ``beta > 0`` without ``mean``, ``reference_mean``
            and ``std``.
    """
    if log_prob.dim() != 1:
        raise ValueError(f"log_prob must have shape (B,), got {tuple(log_prob.shape)}")
    if old_log_prob.shape != log_prob.shape or advantages.shape != log_prob.shape:
        raise ValueError(
            "log_prob, old_log_prob and advantages must share shape (B,), got "
            f"{tuple(log_prob.shape)}, {tuple(old_log_prob.shape)}, {tuple(advantages.shape)}"
        )
    if clip_range < 0:
        raise ValueError(f"clip_range must be non-negative, got {clip_range}")
    if beta < 0:
        raise ValueError(f"beta must be non-negative, got {beta}")

    advantages = advantages.detach()
    log_ratio = log_prob - old_log_prob.detach()
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    policy_loss = torch.maximum(unclipped, clipped).mean()

    if beta > 0:
        if mean is None or reference_mean is None or std is None:
            raise ValueError("beta > 0 needs mean, reference_mean and std for the KL term")
        kl = kl_to_reference(mean, reference_mean, std).mean()
        loss = policy_loss + beta * kl
    else:
        kl = torch.zeros((), dtype=policy_loss.dtype, device=policy_loss.device)
        loss = policy_loss

    with torch.no_grad():
        approx_kl = 0.5 * log_ratio.square().mean()
        clip_fraction = ((ratio - 1.0).abs() > clip_range).to(ratio.dtype).mean()
        ratio_mean = ratio.mean()

    return LossOutput(
        loss=loss,
        policy_loss=policy_loss,
        kl=kl,
        approx_kl=approx_kl.detach(),
        clip_fraction=clip_fraction.detach(),
        ratio_mean=ratio_mean.detach(),
    )
