"""True FLOPs of the phases and of single model calls, counted on the meta device with torch's FLOP counter."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import TypeVar

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from flow_grpo.bench.models import BenchmarkModels
from flow_grpo.bench.phases import seeded_generator, benchmark_texts, rollout_phase, run_phases
from flow_grpo.bench.settings import BenchmarkSettings
from flow_grpo.training.step import adapters_disabled

__all__ = ["component_flops", "count_flops", "count_mode_flops", "count_phase_flops"]

T = TypeVar("T")


@contextlib.contextmanager
def _counting_flops() -> Iterator[FlopCounterMode]:
    """A FLOP counter with attention in its math form (matrix products the counter sees on every device).

    torch's counter knows the fused attention kernels of CUDA but not the CPU one, whose products
    it would miss; on the meta device attention takes the math form anyway. The count is the same.
    """
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        yield counter


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of the operations `fn` runs (matrix products, convolutions, attention), forward and backward."""
    with _counting_flops() as counter:
        fn()
    return int(counter.get_total_flops())


def count_phase_flops(models: BenchmarkModels, settings: BenchmarkSettings) -> dict[str, int]:
    """FLOPs of every phase in `settings.phases` (true work: no bucket padding), run on `models`.

    `models` are normally on the meta device; on a real device the count is the same.
    """
    flops: dict[str, int] = {}

    def measure(phase: str, fn: Callable[[], T]) -> T:
        with _counting_flops() as counter:
            result = fn()
        flops[phase] = int(counter.get_total_flops())
        return result

    run_phases(models, settings, measure, bucketed=False)
    return flops


def count_mode_flops(models: BenchmarkModels, settings: BenchmarkSettings, counted: dict[int, int]) -> dict[int, int]:
    """TP-GRPO rollout FLOPs (decodes included, no bucket padding) of every mode of `settings.completion_steps`.

    Args:
        counted: modes already counted (completion steps -> FLOPs), e.g. the `tp_grpo_rollout` phase's.
    """
    prompts = models.adapter.encode_prompts(benchmark_texts(settings.prompts))
    flops = {}
    for mode in settings.completion_steps:
        if mode not in counted:
            counted[mode] = count_flops(
                lambda: rollout_phase(models, settings, prompts, branches=True, bucketed=False, completion_steps=mode)
            )
        flops[mode] = counted[mode]
    return flops


def component_flops(models: BenchmarkModels, settings: BenchmarkSettings) -> dict[str, int]:
    """FLOPs of single model calls at `settings.resolution`, the LoRA disabled.

    Returns:
        `transformer_forward_per_row`: one transformer forward of one batch row (a CFG state is
        two rows); `vae_decode_per_image`; `reward_per_image`: the reward's image tower on one image.
    """
    adapter = models.adapter
    latents = adapter.initial_latents(1, settings.resolution, seeded_generator(models.device, settings.seed))
    prompts = adapter.encode_prompts(benchmark_texts(1))
    sigma = torch.ones(1, device=models.device)
    rows_per_state = 2 if adapter.uses_cfg else 1
    with torch.no_grad(), adapters_disabled(adapter.transformer):
        transformer = count_flops(lambda: adapter.velocity(latents, sigma, prompts)) // rows_per_state
    vae = count_flops(lambda: adapter.decode(latents))
    image = torch.zeros(1, 3, settings.resolution, settings.resolution, device=models.device)
    reward = count_flops(lambda: models.reward.encoder.image_embeddings(image))
    return {"transformer_forward_per_row": transformer, "vae_decode_per_image": vae, "reward_per_image": reward}
