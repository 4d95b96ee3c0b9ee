"""The stochastic steps of docs/algorithm.md (Stochastic steps and log-probabilities)."""

import math

import pytest
import torch

from flow_grpo.algorithm.sde import euler_step, stochastic_step

SIGMAS = torch.tensor([1.0, 0.9, 0.7, 0.4, 0.0])


def _state(batch: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 5, 5, generator=generator)
    v = torch.randn(batch, 4, 5, 5, generator=generator)
    return x, v


@pytest.mark.parametrize("kind", ["sde", "cps"])
@pytest.mark.parametrize("k", [0, 1, 2])
def test_noise_level_zero_is_euler(kind: str, k: int) -> None:
    x, v = _state()
    out = stochastic_step(kind, v, x, SIGMAS[k], SIGMAS[k + 1], 0.0, sigma_max=float(SIGMAS[1]))
    expected = x + (SIGMAS[k + 1] - SIGMAS[k]) * v
    torch.testing.assert_close(out.next_latents, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(euler_step(v, x, SIGMAS[k], SIGMAS[k + 1]), expected)
    assert torch.all(out.std == 0)


@pytest.mark.parametrize("kind", ["sde", "cps"])
def test_recomputed_log_prob_matches_sampling(kind: str) -> None:
    x, v = _state()
    sigma = torch.tensor([1.0, 0.9, 0.7])  # per-sample sigmas: three grid steps in one call
    sigma_next = torch.tensor([0.9, 0.7, 0.4])
    generator = torch.Generator().manual_seed(1)
    sampled = stochastic_step(kind, v, x, sigma, sigma_next, 0.7, sigma_max=0.9, generator=generator)
    recomputed = stochastic_step(kind, v, x, sigma, sigma_next, 0.7, sigma_max=0.9, next_latents=sampled.next_latents)
    torch.testing.assert_close(recomputed.log_prob, sampled.log_prob)
    torch.testing.assert_close(recomputed.mean, sampled.mean)
    other = stochastic_step(kind, v, x, sigma, sigma_next, 0.7, sigma_max=0.9, next_latents=sampled.next_latents + 0.5)
    assert not torch.allclose(other.log_prob, recomputed.log_prob)


def test_per_sample_sigmas_equal_separate_calls() -> None:
    x, v = _state()
    sigma = torch.tensor([1.0, 0.9, 0.7])
    sigma_next = torch.tensor([0.9, 0.7, 0.4])
    nxt = x + 0.1
    for kind in ("sde", "cps"):
        joint = stochastic_step(kind, v, x, sigma, sigma_next, 0.7, sigma_max=0.9, next_latents=nxt)
        for i in range(3):
            alone = stochastic_step(
                kind, v[i : i + 1], x[i : i + 1], sigma[i], sigma_next[i], 0.7, sigma_max=0.9, next_latents=nxt[i : i + 1]
            )
            torch.testing.assert_close(joint.log_prob[i : i + 1], alone.log_prob)
            torch.testing.assert_close(joint.mean[i : i + 1], alone.mean)


@pytest.mark.parametrize("k", [0, 1, 2])
def test_sde_log_prob_is_normal_log_prob_mean(k: int) -> None:
    x, v = _state()
    generator = torch.Generator().manual_seed(2)
    out = stochastic_step("sde", v, x, SIGMAS[k], SIGMAS[k + 1], 0.7, sigma_max=float(SIGMAS[1]), generator=generator)
    std = out.std.view(-1, 1, 1, 1).expand_as(out.mean)
    expected = torch.distributions.Normal(out.mean, std).log_prob(out.next_latents).flatten(1).mean(1)
    torch.testing.assert_close(out.log_prob, expected, rtol=1e-5, atol=1e-5)


def test_sde_formulas_by_hand() -> None:
    x, v = _state(batch=1)
    a, sigma, sigma_next, sigma_max = 0.7, 1.0, 0.9, 0.9
    scale = a * math.sqrt(sigma / (1 - sigma_max))  # sigma = 1 uses sigma_1 in the denominator
    dt = sigma_next - sigma
    mean = x * (1 + scale**2 / (2 * sigma) * dt) + v * (1 + scale**2 * (1 - sigma) / (2 * sigma)) * dt
    out = stochastic_step("sde", v, x, sigma, sigma_next, a, sigma_max=sigma_max, next_latents=x)
    torch.testing.assert_close(out.mean, mean)
    torch.testing.assert_close(out.std, torch.tensor([scale * math.sqrt(-dt)]))


def test_cps_formulas_by_hand() -> None:
    x, v = _state(batch=1)
    a, sigma, sigma_next = 0.7, 0.7, 0.4
    x0, x1 = x - sigma * v, x + (1 - sigma) * v
    s = sigma_next * math.sin(a * math.pi / 2)
    mean = (1 - sigma_next) * x0 + math.sqrt(sigma_next**2 - s**2) * x1
    nxt = mean + 0.3
    out = stochastic_step("cps", v, x, sigma, sigma_next, a, sigma_max=0.9, next_latents=nxt)
    torch.testing.assert_close(out.mean, mean)
    torch.testing.assert_close(out.std, torch.tensor([s]))
    torch.testing.assert_close(out.log_prob, torch.tensor([-0.09]))


def test_float32_arithmetic_from_half_inputs() -> None:
    x, v = _state()
    out = stochastic_step("cps", v.half(), x.half(), 0.7, 0.4, 0.7, sigma_max=0.9, generator=torch.Generator().manual_seed(0))
    assert out.next_latents.dtype == torch.float32 and out.log_prob.dtype == torch.float32


def test_unknown_kind() -> None:
    x, v = _state()
    with pytest.raises(ValueError, match="unknown step kind"):
        stochastic_step("ddim", v, x, 0.7, 0.4, 0.7, sigma_max=0.9)
