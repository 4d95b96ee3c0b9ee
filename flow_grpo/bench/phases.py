"""The benchmarked phases in training order (rollouts, scoring, the trainer's update) and their timing."""

from __future__ import annotations

import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

import torch

from flow_grpo.bench.models import BenchmarkModels
from flow_grpo.bench.settings import PHASE_TITLES, BenchmarkSettings
from flow_grpo.algorithm.losses import LossOutput
from flow_grpo.models import PromptEmbeds
from flow_grpo.training.step import training_step, window_batches
from flow_grpo.sampling.rollouts import Rollout, training_rollout

__all__ = [
    "Measure",
    "PhaseResult",
    "benchmark_texts",
    "peak_memory",
    "rollout_phase",
    "run_phases",
    "scoring_phase",
    "seeded_generator",
    "synchronize",
    "time_call",
    "time_phases",
    "update_phase",
]

T = TypeVar("T")


def benchmark_texts(count: int) -> list[str]:
    """`count` distinct prompts of equal token length (the reward tokenises them without padding)."""
    return [f"benchmark prompt {i:04d}" for i in range(count)]


def seeded_generator(device: torch.device, seed: int) -> torch.Generator:
    """A generator seeded with `seed` for tensors on `device`."""
    # Meta tensors have no generator: draw on the CPU (randn_tensor moves the values).
    return torch.Generator("cpu" if device.type == "meta" else device).manual_seed(seed)


def rollout_phase(
    models: BenchmarkModels,
    settings: BenchmarkSettings,
    prompts: PromptEmbeds,
    *,
    branches: bool,
    bucketed: bool = True,
    completion_steps: int | None = None,
) -> Rollout:
    """One rollout of the batch, through the trainer's own `training_rollout`: Flow-GRPO's window rollout, or with
    `branches` the lockstep TP-GRPO one (uint8 images in `settings.decode_chunk` decodes, as in training).

    Args:
        bucketed: pad transformer calls to `settings.state_buckets` (off when counting true FLOPs).
        completion_steps: the TP-GRPO completion mode; None = the first of `settings.completion_steps`.
    """
    with models.autocast():
        return training_rollout(
            models.adapter,
            prompts,
            settings.rollout_settings(branches, bucketed, completion_steps),
            window_start=settings.window_start,
            generator=seeded_generator(models.device, settings.seed),
        )


def scoring_phase(models: BenchmarkModels, images: torch.Tensor, texts: list[str]) -> torch.Tensor:
    """Score `images` (N, 3, H, W) against `texts` (N) in one call of the reward: (N,) scores."""
    if images.device.type == "meta":
        # The reward's result goes to the CPU, which a meta tensor cannot; the products are the same.
        return models.reward.encoder.cosine(images, texts)
    return models.reward(images, texts, [{} for _ in texts])


def update_phase(
    models: BenchmarkModels, settings: BenchmarkSettings, prompts: PromptEmbeds, samples: Rollout, advantages: torch.Tensor
) -> LossOutput:
    """One GRPO update over the window with the trainer's own training step; returns the last step's loss.

    For each micro-batch and window step: `policy.training_step` (LoRA forward and log-prob of the
    recorded next state, LoRA-disabled reference forward when `beta > 0`, clipped loss and KL) and
    `policy.UpdateStep.backward`, which applies the one optimizer update at the last step.

    Args:
        prompts: the B rows of conditioning the rollout `samples` used.
        advantages: (B, W) advantages.
    """
    accelerator, model = models.accelerator, models.model
    unwrapped = accelerator.unwrap_model(model)
    order = torch.arange(len(prompts), device=models.device)
    model.train()
    out = None
    for rows in order.split(settings.micro_batch):
        for j, batch in enumerate(window_batches(samples, prompts, rows)):
            with accelerator.accumulate(model):
                out = training_step(
                    models.adapter, model, unwrapped, batch, advantages[rows, j], models.loss_settings, models.autocast,
                    compiled=models.compiled,
                )
                models.update_step.backward(out.loss)
    model.eval()
    assert out is not None  # settings guarantee at least one window step
    return out


Measure = Callable[[str, Callable[[], T]], "T | None"]
"""`measure(phase, fn)` runs `fn` (once or more) and records what it measures; returns the last
result, or None when the phase could not run (e.g. out of memory)."""


def run_phases(models: BenchmarkModels, settings: BenchmarkSettings, measure: Measure, *, bucketed: bool = True) -> None:
    """Run the phases of `settings.phases` in training order, each through `measure`.

    The TP-GRPO rollout's result feeds scoring (its `B (W + 1)` completed images) and the update
    (its window states, with random advantages); it runs once unmeasured when only those are asked.

    Args:
        bucketed: pad rollout transformer calls to `settings.state_buckets` (off when counting true FLOPs).
    """
    texts = benchmark_texts(settings.prompts)
    prompts = models.adapter.encode_prompts(texts)

    def tp_rollout() -> Rollout:
        return rollout_phase(models, settings, prompts, branches=True, bucketed=bucketed)

    if "flow_grpo_rollout" in settings.phases:
        measure("flow_grpo_rollout", lambda: rollout_phase(models, settings, prompts, branches=False, bucketed=bucketed))
    needs_rollout = "scoring" in settings.phases or "update" in settings.phases
    if "tp_grpo_rollout" in settings.phases:
        tp = measure("tp_grpo_rollout", tp_rollout)
    else:
        tp = tp_rollout() if needs_rollout else None
    if tp is None:
        return  # nothing asked of it, or it failed: nothing to score or train on
    if "scoring" in settings.phases:
        images = tp.completed_images.flatten(0, 1)
        per_image = [text for text in texts for _ in range(settings.window_size + 1)]
        measure("scoring", lambda: scoring_phase(models, images, per_image))
    if "update" in settings.phases:
        generator = torch.Generator().manual_seed(settings.seed + 2)
        advantages = torch.randn(settings.prompts, settings.window_size, generator=generator).to(models.device)
        measure("update", lambda: update_phase(models, settings, prompts, tp, advantages))


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); a no-op on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], T], device: torch.device, *, warmup: int, repeats: int) -> tuple[list[float], list[float], T]:
    """Run `fn` `warmup` times untimed, then `repeats` times timed with the device synchronised around each.

    Returns:
        (warm-up seconds, timed seconds, the last result).
    """
    warmup_times, times = [], []
    result: T
    for count, bucket in ((warmup, warmup_times), (repeats, times)):
        for _ in range(count):
            synchronize(device)
            start = time.perf_counter()
            result = fn()
            synchronize(device)
            bucket.append(time.perf_counter() - start)
    return warmup_times, times, result


@dataclass
class PhaseResult:
    """Measurements of one phase.

    Attributes:
        name: phase name (see `PHASES`).
        flops: true FLOPs of one run, counted on the meta device.
        seconds: median of the timed runs; None when only counted or when it failed.
        times: every timed run, seconds.
        warmup_times: the untimed runs, seconds (the first includes any compilation).
        peak_memory_bytes: CUDA: `max_memory_allocated` during the phase (weights included);
            CPU: the process's maximum resident set size so far; None when only counted.
        ceiling_flops_per_second: the matrix-product ceiling the rate is compared with.
        error: why the phase has no time (e.g. out of memory), else None; detail: the message.
    """

    name: str
    flops: int | None
    seconds: float | None = None
    times: list[float] = field(default_factory=list)
    warmup_times: list[float] = field(default_factory=list)
    peak_memory_bytes: int | None = None
    ceiling_flops_per_second: float | None = None
    error: str | None = None
    detail: str = ""

    @property
    def flops_per_second(self) -> float | None:
        """True FLOP/s: counted FLOPs over the median time."""
        return self.flops / self.seconds if self.seconds and self.flops is not None else None

    @property
    def compile_seconds(self) -> float | None:
        """The first warm-up run minus the steady (median) run: compilation and other first-call costs."""
        if not self.warmup_times or self.seconds is None:
            return None
        return max(0.0, self.warmup_times[0] - self.seconds)

    @property
    def fraction_of_ceiling(self) -> float | None:
        """`flops_per_second` over the matrix-product ceiling."""
        if self.flops_per_second is None or not self.ceiling_flops_per_second:
            return None
        return self.flops_per_second / self.ceiling_flops_per_second

    def to_dict(self) -> dict[str, Any]:
        rate = self.flops_per_second
        return {
            **asdict(self),
            "title": PHASE_TITLES[self.name],
            "tflops": self.flops / 1e12,
            "tflops_per_second": rate / 1e12 if rate is not None else None,
            "fraction_of_ceiling": self.fraction_of_ceiling,
            "compile_seconds": self.compile_seconds,
        }


def peak_memory(device: torch.device) -> int:
    """CUDA: bytes allocated at peak since the last reset; CPU: the process's maximum resident set size."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # kilobytes on Linux


def time_phases(models: BenchmarkModels, settings: BenchmarkSettings) -> dict[str, PhaseResult]:
    """Time every phase of `settings.phases` on `models` (FLOPs left 0 for the caller to fill in).

    A phase that runs out of CUDA memory is recorded with its error and the others still run
    (scoring and the update need the TP-GRPO rollout's result).
    """
    device = models.device
    results: dict[str, PhaseResult] = {}

    def measure(phase: str, fn: Callable[[], T]) -> T | None:
        result = results[phase] = PhaseResult(name=phase, flops=0)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        try:
            result.warmup_times, result.times, output = time_call(fn, device, warmup=settings.warmup, repeats=settings.repeats)
        except torch.cuda.OutOfMemoryError as error:
            result.error = "out of memory"
            result.peak_memory_bytes = peak_memory(device)
            result.detail = str(error).splitlines()[0] if str(error) else ""
            models.optimizer.zero_grad(set_to_none=True)
            return None
        result.seconds = statistics.median(result.times)
        result.peak_memory_bytes = peak_memory(device)
        return output

    run_phases(models, settings, measure)
    for phase in settings.phases:
        results.setdefault(phase, PhaseResult(name=phase, flops=0, error="not run: the TP-GRPO rollout failed"))
    return results
