"""Rollouts: the SDE-window rollout (Flow-GRPO-Fast), the lockstep TP-GRPO rollout and ODE sampling.

The lockstep rollout (docs/algorithm.md, The lockstep rollout) advances, at every grid step, all live states with
one batched transformer call: the main SDE trajectory, the ODE baseline forked at the window start,
and one ODE branch forked after each of the first `W - 1` SDE steps. A branch forks from the main
state, whose velocity at that step is already known, so its first ODE step reuses it and the branch
joins the batch at the next grid step. Completed images come out in the order `R_0 ... R_W`.

With `completion_steps = k >= 1` (docs/algorithm.md, Completion modes) a branch reaches sigma 0 in
at most `k` Euler steps on grid points of its remaining grid (`completion_grid`): it joins only the
calls of those grid steps and leaves the batch once it is complete; `k = 1` is the one-step clean
estimate `x - sigma v` from the main trajectory's own velocity, with no transformer call of its own.
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
        completion_steps: Euler steps of each completion, at most (see `completion_grid`); 0 = exact.
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
    completion_steps: int = 0
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
            completion_steps=config.tp.completion_steps,
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


def _check_window(num_steps: int, window_start: int, window_size: int, completion_steps: int = 0) -> None:
    """The window `[s, s + W)` must end before the last step, whose noise is zero; completions take >= 0 steps."""
    if window_size and not 0 <= window_start <= window_start + window_size <= num_steps - 1:
        raise ValueError(
            f"window [{window_start}, {window_start + window_size}) must lie within steps 0..{num_steps - 2}: "
            "the last step has zero noise"
        )
    if completion_steps < 0:
        raise ValueError(f"completion_steps must be >= 0 (0 = exact completions), got {completion_steps}")


def completion_grid(fork: int, num_steps: int, completion_steps: int) -> list[int]:
    """Grid indices a completion forked at grid step `fork` visits, from `fork` to `num_steps` (sigma 0).

    `completion_steps = 0`, or at least the `num_steps - fork` remaining steps, gives every index
    (the exact ODE completion). Otherwise `completion_steps + 1` indices evenly spaced over
    `fork ... num_steps`, rounded half up: the model's own (shifted) schedule, thinned. They are
    grid points, so the branch's velocity at each is computed in the lockstep call of that grid step.
    """
    remaining = num_steps - fork
    if completion_steps == 0 or completion_steps >= remaining:
        return list(range(fork, num_steps + 1))
    return [fork + (2 * t * remaining + completion_steps) // (2 * completion_steps) for t in range(completion_steps + 1)]


def states_per_call(num_steps: int, window_start: int, window_size: int, completion_steps: int) -> list[int]:
    """States per trajectory in the lockstep rollout's transformer call of each of the `num_steps` grid steps.

    The main state, plus every branch whose `completion_grid` passes through that grid step (its
    first step reuses the main velocity at its fork, and sigma 0 needs no call). The sum is the
    transformer rows per trajectory (a CFG state is two rows of the batch).
    """
    counts = [1] * num_steps
    for j in range(window_size):
        for index in completion_grid(window_start + j, num_steps, completion_steps)[1:-1]:
            counts[index] += 1
    return counts


class _Branches:
    """The completion branches of one lockstep rollout, in fork order (branch j completes `R_j`).

    Each branch holds B states at grid index `at[i]` and the indices `ahead[i]` it still has to
    reach; it is live (in the call) at grid step `at[i]` while `ahead[i]` is not empty.
    """

    def __init__(self, prompts: PromptEmbeds, sigmas: torch.Tensor, num_steps: int, completion_steps: int) -> None:
        self.prompts, self.sigmas = prompts, sigmas
        self.num_steps, self.completion_steps = num_steps, completion_steps
        self.states: list[torch.Tensor] = []
        self.at: list[int] = []
        self.ahead: list[list[int]] = []
        self._repeated = prompts  # the prompts once per state of the largest call so far

    def live(self, k: int) -> list[int]:
        """The branches in the call of grid step `k`."""
        return [i for i, (at, ahead) in enumerate(zip(self.at, self.ahead)) if at == k and ahead]

    def conditioning(self, states: int) -> PromptEmbeds:
        """The prompts of a call of `states` trajectories' worth of states (main first), `states * B` rows."""
        rows = states * len(self.prompts)
        if len(self._repeated) < rows:
            self._repeated = PromptEmbeds.cat([self.prompts] * states)
        return self._repeated if len(self._repeated) == rows else self._repeated.select(slice(0, rows))

    def step(self, live: list[int], velocity: torch.Tensor, sigma: torch.Tensor) -> None:
        """Move the `live` branches from `sigma` to their next grid index with `velocity` (len(live) B, ...)."""
        targets = [self.ahead[i].pop(0) for i in live]
        batch = len(self.prompts)
        if len(set(targets)) == 1:
            sigma_next = self.sigmas[targets[0]]
        else:
            # Gathered on the device: an index tensor made from the host list would be a copy to the device per step.
            sigma_next = torch.stack([self.sigmas[t] for t in targets]).repeat_interleave(batch)
        stepped = euler_step(velocity, torch.cat([self.states[i] for i in live]), sigma, sigma_next)
        for n, (i, target) in enumerate(zip(live, targets)):
            self.states[i], self.at[i] = stepped[n * batch : (n + 1) * batch], target

    def fork(self, k: int, x: torch.Tensor, velocity: torch.Tensor) -> None:
        """A new branch from the main states `x` (B, ...) at grid step `k`, stepped with their `velocity`."""
        grid = completion_grid(k, self.num_steps, self.completion_steps)
        self.states.append(euler_step(velocity, x, self.sigmas[k], self.sigmas[grid[1]]))
        self.at.append(grid[1])
        self.ahead.append(grid[2:])


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
    completion_steps: int = 0,
    generator: torch.Generator | list[torch.Generator] | None = None,
    initial_latents: torch.Tensor | None = None,
    window_next_latents: torch.Tensor | None = None,
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
        completion_steps: Euler steps of each completion, at most (`completion_grid`); 0 = exact.
        generator: drives the initial noise (unless `initial_latents` is given) and the step noise.
        initial_latents: (B, ...) noise at sigma 1, overriding the generator's draw.
        window_next_latents: (B, W, ...) window states `x_{k+1}` to replay instead of sampling them
            (their log-probs are computed), so another completion mode completes the same states.
        max_states_per_call: bound on states per transformer call; 0 = no bound.
        state_buckets: pad transformer calls to these state counts (see `_chunked_velocity`).
        decode_chunk: images per VAE decode call; 0 = all in one call.
        uint8_images: return `images` and `completed_images` as uint8 (see `decode_chunked`).
    """
    batch = len(prompts)
    _check_window(num_steps, window_start, window_size, completion_steps)
    grid = adapter.sigmas(num_steps, resolution)
    sigma_max = float(grid[1])  # read on the host once, not per step
    sigmas = grid.to(adapter.device)
    x = adapter.initial_latents(batch, resolution, generator) if initial_latents is None else initial_latents
    x = x.to(device=adapter.device, dtype=torch.float32)
    completions = _Branches(prompts, sigmas, num_steps, completion_steps)
    recorded: dict[str, list[torch.Tensor]] = {"latents": [], "next": [], "log_probs": []}
    for k in range(num_steps):
        sigma, sigma_next = sigmas[k], sigmas[k + 1]
        live = completions.live(k)
        states = torch.cat([x, *(completions.states[i] for i in live)]) if live else x  # no copy of x alone
        velocity = _chunked_velocity(
            adapter, states, sigma.expand(states.shape[0]), completions.conditioning(1 + len(live)),
            max_states_per_call, state_buckets,
        )
        main_velocity = velocity[:batch]
        if live:
            completions.step(live, velocity[batch:], sigma)
        j = k - window_start
        if 0 <= j < window_size:
            if branches:
                # Branch j (j = 0 is the R_0 baseline) leaves the main trajectory here with an ODE step.
                completions.fork(k, x, main_velocity)
            step = stochastic_step(
                step_kind, main_velocity, x, sigma, sigma_next, noise_level, sigma_max=sigma_max, generator=generator,
                next_latents=None if window_next_latents is None else window_next_latents[:, j].to(x.device, torch.float32),
            )
            recorded["latents"].append(x)
            recorded["next"].append(step.next_latents)
            recorded["log_probs"].append(step.log_prob)
            x = step.next_latents
        else:
            x = euler_step(main_velocity, x, sigma, sigma_next)
    return Rollout(
        **_decoded(adapter, x, torch.cat([x[:0], *completions.states]) if branches else None, decode_chunk, uint8_images),
        **_window_record(recorded, x, sigmas, window_start, window_size),
    )


def _window_record(
    recorded: dict[str, list[torch.Tensor]], final: torch.Tensor, sigmas: torch.Tensor, window_start: int, window_size: int
) -> dict[str, torch.Tensor]:
    """The `Rollout` fields of the window: recorded states (B, W, ...), log-probs and sigmas (B, W)."""
    batch = final.shape[0]
    steps = torch.arange(window_start, window_start + window_size, device=final.device)
    return {
        "latents": _stack(recorded["latents"], final),
        "next_latents": _stack(recorded["next"], final),
        "log_probs": torch.stack(recorded["log_probs"], dim=1) if window_size else final.new_zeros(batch, 0),
        "sigmas": sigmas[steps].expand(batch, -1).clone(),
        "next_sigmas": sigmas[steps + 1].expand(batch, -1).clone(),
    }


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
