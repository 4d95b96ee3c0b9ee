"""Rollouts: the SDE-window rollout (Flow-GRPO-Fast), the lockstep TP-GRPO rollout and ODE sampling.

The lockstep rollout (docs/algorithm.md, The lockstep rollout) advances, at every grid step, all live states with
one batched transformer call: the main SDE trajectory, the ODE baseline forked at the window start,
and one ODE branch forked after each of the first `W - 1` SDE steps. A branch forks from the main
state, whose velocity at that step is already known, so its first ODE step reuses it and the branch
joins the batch at the next grid step. Completed images come out in the order `R_0 ... R_W`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import ml_collections
import torch

from flow_grpo.models.base import ModelAdapter, PromptEmbeds
from flow_grpo.rewards.images import to_uint8
from flow_grpo.algorithm.sde import euler_step, stochastic_step


@dataclass
class Rollout:
    """One sampling batch of B trajectories with a window of W stochastic steps.

    Attributes:
        images: (B, 3, H, W_img) final images, float32 in [0, 1] (uint8 with `uint8_images`).
        latents: (B, W, ...) float32 states `x_k` at the window steps.
        next_latents: (B, W, ...) float32 states `x_{k+1}` sampled at the window steps.
        log_probs: (B, W) float32 log-probabilities of `next_latents` under the sampling policy.
        sigmas: (B, W) float32 `sigma_k` of each window step.
        next_sigmas: (B, W) float32 `sigma_{k+1}` of each window step.
        completed_images: (B, W+1, 3, H, W_img) images whose rewards are `R_0 ... R_W`
            (`R_W` is the final image), or None for a plain window rollout.
    """

    images: torch.Tensor
    latents: torch.Tensor
    next_latents: torch.Tensor
    log_probs: torch.Tensor
    sigmas: torch.Tensor
    next_sigmas: torch.Tensor
    completed_images: torch.Tensor | None = None


@dataclass(frozen=True)
class RolloutSettings:
    """How a run's training rollouts sample: one set of settings for the trainer and the benchmark.

    Attributes:
        num_steps, resolution: grid steps N and image side in pixels.
        window_size: W stochastic steps per trajectory.
        noise_level, step_kind: the stochastic step (see `flow_grpo.algorithm.sde`).
        branches: TP-GRPO's lockstep completions (`completed_images`).
        max_states_per_call, state_buckets: bounds on the transformer calls (see `_chunked_velocity`).
        decode_chunk: images per VAE decode call; 0 = all in one call.
        uint8_images: images come out as uint8 (what the rewards score; see `decode_chunked`).
    """

    num_steps: int
    resolution: int
    window_size: int
    noise_level: float
    step_kind: str
    branches: bool
    max_states_per_call: int = 0
    state_buckets: tuple[int, ...] = ()
    decode_chunk: int = 0
    uint8_images: bool = True

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> RolloutSettings:
        """The training rollouts of a training config (`config.sample`, TP-GRPO branches for `tp_grpo`)."""
        sample = config.sample
        return cls(
            num_steps=sample.num_steps,
            resolution=sample.resolution,
            window_size=sample.window_size,
            noise_level=sample.noise_level,
            step_kind=sample.step_kind,
            branches=config.algorithm == "tp_grpo",
            max_states_per_call=sample.max_states_per_call,
            state_buckets=tuple(sample.state_buckets),
            decode_chunk=sample.decode_chunk,
        )


def training_rollout(
    adapter: ModelAdapter,
    prompts: PromptEmbeds,
    settings: RolloutSettings,
    *,
    window_start: int,
    generator: torch.Generator | list[torch.Generator] | None,
) -> Rollout:
    """One training sampling batch (B = len(prompts) trajectories) with the window starting at `window_start`."""
    return rollout(adapter, prompts, window_start=window_start, generator=generator, **asdict(settings))


def draw_window_start(generator: torch.Generator, window_range: tuple[int, int], window_size: int) -> int:
    """Draw `s ~ U{r0, ..., r1 - W}` with `generator` (one draw per sampling batch, on its device)."""
    low, high = window_range
    draw = torch.randint(low, high - window_size + 1, (1,), generator=generator, device=generator.device)
    return int(draw.item())


def _chunked_velocity(
    adapter: ModelAdapter,
    latents: torch.Tensor,
    sigmas: torch.Tensor,
    prompts: PromptEmbeds,
    max_states_per_call: int,
    state_buckets: tuple[int, ...] = (),
) -> torch.Tensor:
    """Velocity of all states (B, ...), in calls of bounded size and, optionally, bucketed shapes.

    Calls hold at most `max_states_per_call` states (0 = one call), or with `state_buckets` at most
    the largest bucket, each padded (by repeating its last state) up to the smallest bucket that
    fits, so a compiled transformer sees only the bucket shapes. Padding rows are dropped.
    """
    total = latents.shape[0]
    size = max(state_buckets) if state_buckets else (max_states_per_call or total)
    if size >= total and not state_buckets:
        return adapter.velocity(latents, sigmas, prompts)
    parts = []
    for start in range(0, total, size):
        count = min(size, total - start)
        padded = min((b for b in state_buckets if b >= count), default=count)
        rows = torch.arange(start, start + padded, device=latents.device).clamp(max=start + count - 1)
        velocity = adapter.velocity(latents[rows], sigmas[rows], prompts.select(rows))
        parts.append(velocity[:count])
    return torch.cat(parts)


def decode_chunked(adapter: ModelAdapter, latents: torch.Tensor, chunk: int = 0, uint8: bool = False) -> torch.Tensor:
    """Decode latents (B, ...) to images (B, 3, H, W), at most `chunk` per VAE call (0 = one call).

    Images are float32 in [0, 1], or with `uint8` rounded per chunk by `flow_grpo.rewards.images.to_uint8`
    (the rewards' own rounding, so they score them exactly as the float images), so no float32
    copy of the whole batch exists at once.
    """
    size = chunk if chunk > 0 else latents.shape[0]
    parts = []
    for i in range(0, latents.shape[0], size):
        images = adapter.decode(latents[i : i + size])
        parts.append(to_uint8(images) if uint8 else images)
        del images
    return torch.cat(parts)


def _check_window(num_steps: int, window_start: int, window_size: int) -> None:
    """The window `[s, s + W)` must end before the last step, whose noise is zero."""
    if window_size and not 0 <= window_start <= window_start + window_size <= num_steps - 1:
        raise ValueError(
            f"window [{window_start}, {window_start + window_size}) must lie within steps 0..{num_steps - 2}: "
            "the last step has zero noise"
        )


@torch.no_grad()
def rollout(
    adapter: ModelAdapter,
    prompts: PromptEmbeds,
    *,
    num_steps: int,
    resolution: int,
    window_start: int,
    window_size: int,
    noise_level: float,
    step_kind: str,
    branches: bool = False,
    generator: torch.Generator | list[torch.Generator] | None = None,
    initial_latents: torch.Tensor | None = None,
    max_states_per_call: int = 0,
    state_buckets: tuple[int, ...] = (),
    decode_chunk: int = 0,
    uint8_images: bool = False,
) -> Rollout:
    """Sample B = len(prompts) trajectories with stochastic steps `[s, s + W)` and ODE steps elsewhere.

    Args:
        adapter: the model adapter.
        prompts: encoded prompts, B rows.
        num_steps: grid steps N.
        resolution: image side in pixels.
        window_start, window_size: `s` and `W`, `s + W <= N - 1`; `W = 0` gives plain ODE sampling.
        noise_level, step_kind: the stochastic step (see `flow_grpo.algorithm.sde`).
        branches: also compute the TP-GRPO completions (lockstep) and return `completed_images`.
        generator: drives the initial noise (unless `initial_latents` is given) and the step noise.
        initial_latents: (B, ...) noise at sigma 1, overriding the generator's draw.
        max_states_per_call: bound on states per transformer call; 0 = no bound.
        state_buckets: pad transformer calls to these state counts (see `_chunked_velocity`).
        decode_chunk: images per VAE decode call; 0 = all in one call.
        uint8_images: return `images` and `completed_images` as uint8 (see `decode_chunked`).
    """
    batch = len(prompts)
    _check_window(num_steps, window_start, window_size)
    grid = adapter.sigmas(num_steps, resolution)
    sigma_max = float(grid[1])  # read on the host once, not per step
    sigmas = grid.to(adapter.device)
    if initial_latents is None:
        x = adapter.initial_latents(batch, resolution, generator)
    else:
        x = initial_latents.to(device=adapter.device, dtype=torch.float32)
    live_prompts = prompts  # conditioning of [main, branches...], grown when a branch forks
    branch_states = x.new_zeros((0, *x.shape[1:]))
    recorded: dict[str, list[torch.Tensor]] = {"latents": [], "next": [], "log_probs": []}
    for k in range(num_steps):
        sigma, sigma_next = sigmas[k], sigmas[k + 1]
        states = torch.cat([x, branch_states])
        velocity = _chunked_velocity(
            adapter, states, sigma.expand(states.shape[0]), live_prompts, max_states_per_call, state_buckets
        )
        main_velocity = velocity[:batch]
        branch_states = euler_step(velocity[batch:], branch_states, sigma, sigma_next)
        j = k - window_start
        if 0 <= j < window_size:
            if branches:
                # Branch j (j = 0 is the R_0 baseline) leaves the main trajectory here with an ODE step.
                branch_states = torch.cat([branch_states, euler_step(main_velocity, x, sigma, sigma_next)])
                live_prompts = PromptEmbeds.cat([live_prompts, prompts])
            step = stochastic_step(
                step_kind, main_velocity, x, sigma, sigma_next, noise_level,
                sigma_max=sigma_max, generator=generator,
            )
            recorded["latents"].append(x)
            recorded["next"].append(step.next_latents)
            recorded["log_probs"].append(step.log_prob)
            x = step.next_latents
        else:
            x = euler_step(main_velocity, x, sigma, sigma_next)
    steps = torch.arange(window_start, window_start + window_size, device=x.device)
    return Rollout(
        **_decoded(adapter, x, branch_states if branches else None, decode_chunk, uint8_images),
        latents=_stack(recorded["latents"], x),
        next_latents=_stack(recorded["next"], x),
        log_probs=torch.stack(recorded["log_probs"], dim=1) if window_size else x.new_zeros(batch, 0),
        sigmas=sigmas[steps].expand(batch, -1).clone(),
        next_sigmas=sigmas[steps + 1].expand(batch, -1).clone(),
    )


def _decoded(
    adapter: ModelAdapter, final: torch.Tensor, branch_states: torch.Tensor | None, decode_chunk: int, uint8_images: bool
) -> dict[str, torch.Tensor | None]:
    """`images` (B, 3, H, W) of the final latents and, with branches, `completed_images` (B, W + 1, 3, H, W).

    The branch states (W B rows, branch-major) and the final latents are decoded together; the
    final image is the last completion of each trajectory.
    """
    if branch_states is None:
        return {"images": decode_chunked(adapter, final, decode_chunk, uint8_images), "completed_images": None}
    batch = final.shape[0]
    decoded = decode_chunked(adapter, torch.cat([branch_states, final]), decode_chunk, uint8_images)
    completed = decoded.view(-1, batch, *decoded.shape[1:]).transpose(0, 1)
    return {"images": completed[:, -1], "completed_images": completed}


def _stack(states: list[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    if not states:
        return like.new_zeros((like.shape[0], 0, *like.shape[1:]))
    return torch.stack(states, dim=1)


def sample_ode(
    adapter: ModelAdapter,
    prompts: PromptEmbeds,
    *,
    num_steps: int,
    resolution: int,
    generator: torch.Generator | list[torch.Generator] | None = None,
    initial_latents: torch.Tensor | None = None,
    max_states_per_call: int = 0,
    state_buckets: tuple[int, ...] = (),
) -> torch.Tensor:
    """Deterministic (Euler ODE) sampling for evaluation; returns images (B, 3, H, W) in [0, 1]."""
    result = rollout(
        adapter,
        prompts,
        num_steps=num_steps,
        resolution=resolution,
        window_start=0,
        window_size=0,
        noise_level=0.0,
        step_kind="sde",
        generator=generator,
        initial_latents=initial_latents,
        max_states_per_call=max_states_per_call,
        state_buckets=state_buckets,
    )
    return result.images
