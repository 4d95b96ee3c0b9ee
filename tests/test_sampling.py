"""Rollouts: parity with the diffusers pipeline, log-prob consistency, lockstep exactness, seeds."""

from __future__ import annotations

import pytest
import torch
from diffusers import StableDiffusion3Pipeline

from flow_grpo.models import SD3Adapter
from flow_grpo.sampling import draw_window_start, rollout, sample_ode
from flow_grpo.sde import euler_step, stochastic_step

PROMPTS = ["a red bicycle", "Two cats on a sofa", "a lighthouse at dusk"]


def _adapter(path: str, guidance: float = 4.5) -> SD3Adapter:
    return SD3Adapter.from_pretrained(path, guidance_scale=guidance, max_sequence_length=32)


@pytest.fixture(scope="module")
def adapter(tiny_sd3_dir: str) -> SD3Adapter:
    return _adapter(tiny_sd3_dir)


@pytest.mark.parametrize("geometry", ["minimal", "real"])
@pytest.mark.parametrize("guidance", [4.5, 1.0])
def test_ode_rollout_matches_diffusers_pipeline(geometry, guidance, tiny_sd3_dir, tiny_sd3_real_dir) -> None:
    path = tiny_sd3_dir if geometry == "minimal" else tiny_sd3_real_dir
    resolution = 16 if geometry == "minimal" else 64
    adapter = _adapter(path, guidance)
    noise = adapter.initial_latents(len(PROMPTS), resolution, torch.Generator().manual_seed(3))
    pipeline = StableDiffusion3Pipeline.from_pretrained(path)
    pipeline.set_progress_bar_config(disable=True)
    expected = pipeline(
        prompt=PROMPTS,
        latents=noise.clone(),
        num_inference_steps=5,
        guidance_scale=guidance,
        height=resolution,
        width=resolution,
        max_sequence_length=32,
        output_type="pt",
    ).images
    embeds = adapter.encode_prompts(PROMPTS)
    for kind in ("sde", "cps"):
        # Noise level 0 inside a window: the stochastic steps must reduce to the pipeline's Euler steps.
        result = rollout(
            adapter, embeds, num_steps=5, resolution=resolution, window_start=1, window_size=3,
            noise_level=0.0, step_kind=kind, initial_latents=noise,
        )
        torch.testing.assert_close(result.images, expected, rtol=1e-5, atol=1e-5)
    ode = sample_ode(adapter, embeds, num_steps=5, resolution=resolution, initial_latents=noise)
    torch.testing.assert_close(ode, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["sde", "cps"])
def test_rollout_log_probs_recompute(adapter, kind) -> None:
    embeds = adapter.encode_prompts(PROMPTS)
    result = rollout(
        adapter, embeds, num_steps=6, resolution=16, window_start=1, window_size=3,
        noise_level=0.7, step_kind=kind, generator=torch.Generator().manual_seed(0),
    )
    assert result.latents.shape == (3, 3, 4, 16, 16) and result.log_probs.shape == (3, 3)
    assert result.timesteps.tolist() == [[1, 2, 3]] * 3
    sigmas = adapter.sigmas(6, 16)
    for j in range(3):
        torch.testing.assert_close(result.sigmas[:, j], sigmas[1 + j].expand(3))
        velocity = adapter.velocity(result.latents[:, j], result.sigmas[:, j], embeds)
        step = stochastic_step(
            kind, velocity, result.latents[:, j], result.sigmas[:, j], result.next_sigmas[:, j], 0.7,
            sigma_max=float(sigmas[1]), next_latents=result.next_latents[:, j],
        )
        torch.testing.assert_close(step.log_prob, result.log_probs[:, j], rtol=1e-5, atol=1e-6)
        if j:
            torch.testing.assert_close(result.latents[:, j], result.next_latents[:, j - 1])


def test_seeds_reproduce(adapter) -> None:
    embeds = adapter.encode_prompts(PROMPTS)

    def run(seed: int):
        return rollout(
            adapter, embeds, num_steps=5, resolution=16, window_start=0, window_size=3,
            noise_level=0.7, step_kind="cps", generator=torch.Generator().manual_seed(seed),
        )

    first, again, other = run(0), run(0), run(1)
    assert torch.equal(first.images, again.images) and torch.equal(first.next_latents, again.next_latents)
    assert torch.equal(first.log_probs, again.log_probs)
    assert not torch.allclose(first.images, other.images)
    assert not torch.allclose(first.next_latents, other.next_latents)


class _CountingTransformer(torch.nn.Module):
    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.batches: list[int] = []

    def forward(self, **kwargs):
        self.batches.append(kwargs["hidden_states"].shape[0])
        return self.inner(**kwargs)


@pytest.mark.parametrize("window_start,window_size", [(0, 4), (1, 3), (2, 1)])
def test_lockstep_completions_equal_separate_branches(adapter, window_start, window_size) -> None:
    num_steps, batch = 6, 3
    embeds = adapter.encode_prompts(PROMPTS)
    noise = adapter.initial_latents(batch, 16, torch.Generator().manual_seed(5))
    counter = _CountingTransformer(adapter.transformer)
    result = rollout(
        adapter, embeds, num_steps=num_steps, resolution=16, window_start=window_start, window_size=window_size,
        noise_level=0.7, step_kind="cps", branches=True, generator=torch.Generator().manual_seed(6),
        initial_latents=noise, transformer=counter,
    )
    # One transformer call per grid step (CFG doubles the rows, not the calls).
    assert len(counter.batches) == num_steps
    live = [2 * batch * (1 + max(0, min(k - window_start, window_size))) for k in range(num_steps)]
    assert counter.batches == live
    completed = result.completed_images
    assert completed.shape == (batch, window_size + 1, 3, 16, 16)
    assert torch.equal(completed[:, -1], result.images)  # R_W is the main image

    sigmas = adapter.sigmas(num_steps, 16)

    def complete(state: torch.Tensor, start: int) -> torch.Tensor:
        for k in range(start, num_steps):
            state = euler_step(adapter.velocity(state, sigmas[k].expand(batch), embeds), state, sigmas[k], sigmas[k + 1])
        return adapter.decode(state)

    # R_0: pure ODE from the trajectory's own initial noise.
    torch.testing.assert_close(completed[:, 0], complete(noise, 0), rtol=1e-5, atol=1e-5)
    # R_j: j SDE steps of the window, then ODE to the end, from the recorded states.
    for j in range(1, window_size):
        torch.testing.assert_close(
            completed[:, j], complete(result.latents[:, j], window_start + j), rtol=1e-5, atol=1e-5
        )


def test_chunked_calls_give_same_rollout(adapter) -> None:
    embeds = adapter.encode_prompts(PROMPTS)
    kwargs = dict(
        num_steps=5, resolution=16, window_start=0, window_size=3, noise_level=0.7, step_kind="cps", branches=True,
    )
    whole = rollout(adapter, embeds, generator=torch.Generator().manual_seed(0), **kwargs)
    counter = _CountingTransformer(adapter.transformer)
    chunked = rollout(
        adapter, embeds, generator=torch.Generator().manual_seed(0), max_states_per_call=4,
        transformer=counter, **kwargs,
    )
    assert max(counter.batches) <= 2 * 4 and len(counter.batches) > 5
    torch.testing.assert_close(chunked.completed_images, whole.completed_images, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(chunked.log_probs, whole.log_probs, rtol=1e-5, atol=1e-6)


def test_window_reaching_last_step_is_rejected(adapter) -> None:
    embeds = adapter.encode_prompts(PROMPTS[:1])
    with pytest.raises(ValueError, match="last step"):
        rollout(adapter, embeds, num_steps=4, resolution=16, window_start=1, window_size=3, noise_level=0.7, step_kind="cps")


def test_draw_window_start_covers_range() -> None:
    generator = torch.Generator().manual_seed(0)
    draws = {draw_window_start(generator, (1, 7), 3) for _ in range(200)}
    assert draws == {1, 2, 3, 4}
