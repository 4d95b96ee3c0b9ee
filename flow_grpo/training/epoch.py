"""One process's share of an epoch: its rollouts, their rewards, and the micro-batches trained on them."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import ml_collections
import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from flow_grpo.data import EpochPlan, PromptDataset
from flow_grpo.models import ModelAdapter, PromptEmbeds
from flow_grpo.training.step import WindowBatch, window_batches
from flow_grpo.rewards import AsyncScorer, MultiReward
from flow_grpo.sampling.rollouts import Rollout, RolloutSettings, draw_window_start, training_rollout
from flow_grpo.seeding import derived_seed

__all__ = ["EpochSamples", "encode_epoch_prompts", "sample_epoch"]


@dataclass
class EpochSamples:
    """Everything one process keeps from an epoch's rollouts (Bp trajectories, W window steps).

    Attributes:
        prompts: encoded prompts, Bp rows.
        latents, next_latents: (Bp, W, ...) window states.
        log_probs, sigmas, next_sigmas: (Bp, W).
        group_ids: (Bp,) int64 prompt group of each trajectory.
        rewards: name -> (Bp,) final-image reward (and "avg", the weighted sum).
        completed_rewards: (Bp, W+1) weighted rewards R_0 ... R_W (TP-GRPO only).
        sampling_seconds: time spent in rollouts (scoring overlaps them; the rest is waiting for it).
    """

    prompts: PromptEmbeds
    latents: torch.Tensor
    next_latents: torch.Tensor
    log_probs: torch.Tensor
    sigmas: torch.Tensor
    next_sigmas: torch.Tensor
    group_ids: torch.Tensor
    rewards: dict[str, torch.Tensor]
    completed_rewards: torch.Tensor | None
    sampling_seconds: float = 0.0

    def window_batches(self, rows: torch.Tensor) -> Iterator[WindowBatch]:
        """The window steps of the trajectories `rows` (b,) as training micro-batches, in step order."""
        return window_batches(self, self.prompts, rows)


def _rollout_batch(
    config: ml_collections.ConfigDict, accelerator: Accelerator, adapter: ModelAdapter, embeds: PromptEmbeds, seed: int
) -> Rollout:
    """One batch's rollout with its own generator `seed`, which also draws the window start."""
    sample = config.sample
    generator = torch.Generator(accelerator.device).manual_seed(seed)
    window_start = draw_window_start(generator, tuple(sample.window_range), sample.window_size)
    with accelerator.autocast():
        return training_rollout(adapter, embeds, RolloutSettings.from_config(config), window_start=window_start, generator=generator)


def encode_epoch_prompts(adapter: ModelAdapter, batches: list[list[str]], chunk: int) -> list[PromptEmbeds]:
    """Encode each distinct prompt of the epoch once, `chunk` prompts per encoder call, then index per batch.

    Args:
        batches: the prompt texts of every sampling batch.
    Returns:
        one PromptEmbeds per batch, with `len(batches[i])` rows.
    """
    distinct = list(dict.fromkeys(text for texts in batches for text in texts))
    encoded = PromptEmbeds.cat([adapter.encode_prompts(distinct[i : i + chunk]) for i in range(0, len(distinct), chunk)])
    row = {text: i for i, text in enumerate(distinct)}
    device = next(iter(encoded.tensors.values())).device
    return [encoded.select(torch.tensor([row[text] for text in texts], device=device)) for texts in batches]


@torch.no_grad()
def sample_epoch(
    config: ml_collections.ConfigDict,
    accelerator: Accelerator,
    adapter: ModelAdapter,
    reward: MultiReward,
    dataset: PromptDataset,
    plan: EpochPlan,
    epoch: int,
) -> EpochSamples:
    """Run this process's rollouts of `epoch` (batches of `plan`) and score them; scoring overlaps the next batch.

    The epoch's distinct prompts are encoded first, in one pass; with `config.offload_text_encoders`
    the text encoders then wait on the CPU. TP-GRPO scores every completed image (`W + 1` per
    trajectory), Flow-GRPO the final images; the rewards get them as uint8 and only the scorer
    holds them, until they are scored.
    """
    tp = config.algorithm == "tp_grpo"
    per_image = config.sample.window_size + 1
    pending, batches = [], []
    started = time.perf_counter()
    gathered = [dataset.gather(plan.dataset_indices[i]) for i in range(plan.num_batches)]
    embeds_per_batch = encode_epoch_prompts(adapter, [texts for texts, _ in gathered], config.sample.batch_size)
    if config.offload_text_encoders:
        adapter.offload_text_encoders()
    with AsyncScorer(reward) as scorer:
        progress = tqdm(
            range(plan.num_batches), desc=f"epoch {epoch}: sampling", disable=not accelerator.is_local_main_process, leave=False
        )
        for i in progress:
            (texts, metadata), embeds = gathered[i], embeds_per_batch[i]
            result = _rollout_batch(config, accelerator, adapter, embeds, derived_seed(config.seed, epoch, accelerator.process_index, i))
            if tp:
                images = result.completed_images.flatten(0, 1)
                texts = [t for t in texts for _ in range(per_image)]
                metadata = [m for m in metadata for _ in range(per_image)]
            else:
                images = result.images
            pending.append(scorer.submit(images, texts, metadata))  # rewards move images where they run
            del images
            result.images = result.completed_images = None  # the scorer holds the images until they are scored
            batches.append((embeds, result, plan.group_ids[i]))
        sampling_seconds = time.perf_counter() - started
        scores = [future.result() for future in pending]  # the wait here is scoring not hidden by sampling
    device = accelerator.device
    rewards: dict[str, list[torch.Tensor]] = {}
    completed = []
    for score in scores:
        for name, value in score.items():
            value = value.to(device)
            if tp:
                value = value.view(-1, per_image)
                if name == "avg":
                    completed.append(value)
                value = value[:, -1]  # R_W: the final image
            rewards.setdefault(name, []).append(value)
    return EpochSamples(
        prompts=PromptEmbeds.cat([b[0] for b in batches]),
        latents=torch.cat([b[1].latents for b in batches]),
        next_latents=torch.cat([b[1].next_latents for b in batches]),
        log_probs=torch.cat([b[1].log_probs for b in batches]),
        sigmas=torch.cat([b[1].sigmas for b in batches]),
        next_sigmas=torch.cat([b[1].next_sigmas for b in batches]),
        group_ids=torch.cat([b[2] for b in batches]).to(device),
        rewards={name: torch.cat(values) for name, values in rewards.items()},
        completed_rewards=torch.cat(completed) if tp else None,
        sampling_seconds=sampling_seconds,
    )
