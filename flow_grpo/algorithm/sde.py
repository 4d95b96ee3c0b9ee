"""Stochastic denoising steps with log-probabilities (docs/algorithm.md).

Both step kinds reduce to the Euler ODE step `x + (sigma_next - sigma) * v` at noise level 0.
All arithmetic is float32 whatever the model dtype. Sigmas are per sample, so states at
different grid steps can share one call.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from diffusers.utils.torch_utils import randn_tensor

STEP_KINDS = ("sde", "cps")


@dataclass(frozen=True)
class StepOutput:
    """Result of one step.

    Attributes:
        next_latents: (B, ...) float32, the sampled (or given) `x_{k+1}`.
        log_prob: (B,) float32 log-probability of `next_latents`, averaged over latent dims.
        mean: (B, ...) float32 mean `mu` of the step distribution.
        std: (B,) float32 standard deviation of the step noise (used by the KL).
    """

    next_latents: torch.Tensor
    log_prob: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor


def _per_sample(value: torch.Tensor | float, batch: int, device: torch.device) -> torch.Tensor:
    value = torch.as_tensor(value, dtype=torch.float32, device=device)
    return value.expand(batch) if value.ndim == 0 else value.to(torch.float32)


def _view(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return value.view(-1, *([1] * (like.ndim - 1)))


def euler_step(velocity: torch.Tensor, latents: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
    """Deterministic ODE step `x + (sigma_next - sigma) * v` in float32.

    Args:
        velocity, latents: (B, ...). sigma, sigma_next: (B,) or scalars.
    Returns:
        (B, ...) float32.
    """
    batch, device = latents.shape[0], latents.device
    dt = _per_sample(sigma_next, batch, device) - _per_sample(sigma, batch, device)
    return latents.float() + _view(dt, latents) * velocity.float()


def stochastic_step(
    kind: str,
    velocity: torch.Tensor,
    latents: torch.Tensor,
    sigma: torch.Tensor | float,
    sigma_next: torch.Tensor | float,
    noise_level: float,
    *,
    sigma_max: float,
    next_latents: torch.Tensor | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
) -> StepOutput:
    """One `sde` or `cps` step from `x_k` to `x_{k+1}` and the log-prob of `x_{k+1}`.

    Args:
        kind: "sde" (Flow-GRPO) or "cps" (coefficients-preserving sampling).
        velocity: (B, ...) model velocity at `latents`.
        latents: (B, ...) state `x_k`.
        sigma, sigma_next: (B,) per-sample sigmas (or scalars) of `x_k` and `x_{k+1}`.
        noise_level: `a` in [0, 1].
        sigma_max: the schedule's second sigma `sigma_1`; the `sde` kind uses it in place of
            `sigma_k` in `1 - sigma_k` when `sigma_k = 1`.
        next_latents: if given, `x_{k+1}` is not sampled and its log-prob is computed (training).
        generator: generator(s) for the step noise when sampling.
    Returns:
        StepOutput with float32 tensors.
    """
    if kind not in STEP_KINDS:
        raise ValueError(f"unknown step kind {kind!r}; use one of {STEP_KINDS}")
    x = latents.float()
    v = velocity.float()
    batch, device = x.shape[0], x.device
    sigma = _per_sample(sigma, batch, device)
    sigma_next = _per_sample(sigma_next, batch, device)
    if kind == "sde":
        dt = sigma_next - sigma
        denominator = 1.0 - torch.where(sigma == 1.0, torch.full_like(sigma, sigma_max), sigma)
        scale = noise_level * torch.sqrt(sigma / denominator)
        mean = _view(1.0 + scale**2 / (2.0 * sigma) * dt, x) * x + _view(
            (1.0 + scale**2 * (1.0 - sigma) / (2.0 * sigma)) * dt, x
        ) * v
        std = scale * torch.sqrt(-dt)
    else:
        x0 = x - _view(sigma, x) * v
        x1 = x + _view(1.0 - sigma, x) * v
        std = sigma_next * math.sin(noise_level * math.pi / 2.0)
        mean = _view(1.0 - sigma_next, x) * x0 + _view(torch.sqrt(sigma_next**2 - std**2), x) * x1
    if next_latents is None:
        noise = randn_tensor(tuple(x.shape), generator=generator, device=device, dtype=torch.float32)
        next_latents = mean + _view(std, x) * noise
    else:
        next_latents = next_latents.float()
    squared = (next_latents.detach() - mean) ** 2
    if kind == "sde":
        variance = _view(std, x) ** 2
        log_density = -squared / (2.0 * variance) - _view(torch.log(std), x) - 0.5 * math.log(2.0 * math.pi)
        log_prob = log_density.flatten(1).mean(dim=1)
    else:
        log_prob = -squared.flatten(1).mean(dim=1)
    return StepOutput(next_latents=next_latents, log_prob=log_prob, mean=mean, std=std)

