"""Evaluation: ODE-sample prompts, score every image with the eval rewards, reduce over processes.

`evaluate` is the one evaluation loop: the trainer's periodic evaluation (`Trainer.evaluate`) and
`scripts/evaluate.py` (`run_evaluation`, which adds model loading and the `summary.json` /
`scores.csv` reports) both call it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ml_collections
import torch
from accelerate import PartialState
from accelerate.logging import get_logger
from accelerate.utils import gather_object, reduce

from flow_grpo.sampling.generation import (
    AutocastFactory,
    ImageJob,
    SamplingRequest,
    check_model_inputs,
    config_batches,
    image_filename,
    load_model,
    plan_sampling,
    sampling_settings,
    sort_records,
)
from flow_grpo.models import ModelAdapter
from flow_grpo.run.outputs import claim_output_dir, save_png, summarize_scores, write_json, write_scores_csv
from flow_grpo.rewards import AVERAGE_KEY, MultiReward, build_reward, check_reward_names

__all__ = ["EvalResult", "evaluate", "run_evaluation"]

logger = get_logger(__name__)

BatchHook = Callable[[list[ImageJob], torch.Tensor, Mapping[str, torch.Tensor]], None]
"""`hook(jobs of the batch, images (B, 3, H, W) in [0, 1], scores name -> (B,))`, called per batch."""


@dataclass
class EvalResult:
    """What `evaluate` returns.

    Attributes:
        means: reward name (and `"avg"`, the weighted sum, and each `"<reward>/<detail>"`) -> mean
            over every process's images whose score is finite (NaN when none is).
        count: number of images scored over all processes.
        nonfinite: reward name (and `"avg"`) -> number of NaN/inf scores left out of its mean.
        images: this process's first `keep_images` images as `(image (3, H, W) on the CPU, prompt, avg score)`.
        records: with `collect_records`, one dict per image of every process (prompt index, image
            index, seed, prompt, one score per reward name), ordered by prompt then sample; else empty.
    """

    means: dict[str, float]
    count: int
    images: list[tuple[torch.Tensor, str, float]] = field(default_factory=list)
    records: list[dict[str, Any]] = field(default_factory=list)
    nonfinite: dict[str, int] = field(default_factory=dict)


@torch.no_grad()
def evaluate(
    adapter: ModelAdapter,
    reward: MultiReward,
    jobs: Sequence[ImageJob],
    sample: ml_collections.ConfigDict,
    *,
    batch_seed: Callable[[Sequence[ImageJob]], int] | None = None,
    autocast: AutocastFactory | None = None,
    keep_images: int = 0,
    collect_records: bool = False,
    on_batch: BatchHook | None = None,
    progress: bool = False,
) -> EvalResult:
    """ODE-sample `jobs` with the evaluation settings of `sample` (`config.sample`) and score them.

    The jobs are dealt round-robin to the processes of `PartialState()`, so each image is computed
    exactly once; every process must call this (the means are reduced over processes).

    Args:
        adapter: the model to sample (with whatever LoRA / EMA weights are active).
        reward: the eval rewards; its scores include `"avg"`, the weighted sum.
        jobs: every image to sample, with its seed (`flow_grpo.sampling.generation.plan_jobs`).
        sample: `config.sample` (`eval_num_steps`, `resolution`, `eval_batch_size`,
            `max_states_per_call`, `state_buckets`).
        batch_seed, autocast: see `flow_grpo.sampling.generation.generate_batches`.
        keep_images: keep this process's first this many images (for a logged grid).
        collect_records: gather every image's record from all processes.
        on_batch: called with each batch's jobs, images and scores (e.g. to write PNG files).
        progress: show a progress bar.
    """
    state = PartialState()
    device = state.device
    names = [*reward.names, AVERAGE_KEY, *reward.detail_names]  # details: NaN where they do not apply
    totals = torch.zeros(len(names) + 1, device=device)  # per-reward sums of finite scores, then the count
    finite = torch.zeros(len(names), device=device)  # per-reward counts of finite scores
    kept: list[tuple[torch.Tensor, str, float]] = []
    local: list[dict[str, Any]] = []
    own_jobs = jobs[state.process_index :: state.num_processes]
    batches = config_batches(adapter, own_jobs, sample, batch_seed=batch_seed, autocast=autocast, progress=progress)
    for chunk, images in batches:
        texts = [job.text for job in chunk]
        scores = reward(images, texts, [job.metadata for job in chunk])
        stacked = torch.stack([scores[name].float() for name in names]).to(device)  # (rewards, B)
        ok = torch.isfinite(stacked)
        totals[:-1] += torch.where(ok, stacked, 0.0).sum(dim=1)
        finite += ok.sum(dim=1)
        totals[-1] += len(chunk)
        for image, text, score in zip(images, texts, scores[AVERAGE_KEY].tolist()):
            if len(kept) < keep_images:
                kept.append((image.cpu(), text, score))
        if collect_records:
            for row, job in enumerate(chunk):
                record = {"prompt_index": job.prompt_index, "image_index": job.image_index, "seed": job.seed, "prompt": job.text}
                local.append(record | {name: float(scores[name][row]) for name in names})
        if on_batch is not None:
            on_batch(chunk, images, scores)
    totals, finite = reduce(totals, "sum"), reduce(finite, "sum")
    count = int(totals[-1].item())
    means = {name: (totals[i] / finite[i]).item() if finite[i] else float("nan") for i, name in enumerate(names)}
    nonfinite = {name: count - int(finite[i].item()) for i, name in enumerate(names) if name not in reward.detail_names}
    for name, missing in nonfinite.items():
        if missing:
            logger.warning(f"evaluation: {missing} of {count} {name} scores are NaN or infinite; left out of the mean")
    records = sort_records(gather_object(local)) if collect_records else []
    return EvalResult(means, count, kept, records, nonfinite)


def run_evaluation(
    config: ml_collections.ConfigDict,
    out_dir: str | os.PathLike[str],
    request: SamplingRequest = SamplingRequest(),
    *,
    rewards: Mapping[str, float] | None = None,
    save_images: bool = False,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Sample the prompts with the ODE sampler, score every image, write `summary.json` and `scores.csv`.

    Work is split over the processes of `PartialState()` and the main process writes the reports.
    Settings come from `config` (`sample.eval_num_steps`, `sample.guidance_scale`,
    `sample.resolution`, `sample.eval_batch_size`, `seed`); every image has its own seed.

    Args:
        config: a training config (preset plus overrides).
        out_dir: directory for `summary.json`, `scores.csv` (and `images/` with `save_images`).
        request: the LoRA (None: the base model) and the prompts (default: the config's test split).
        rewards: reward name -> weight; None or empty uses `config.eval_reward_fn`.
        save_images: also write every image as a PNG.
        overwrite: replace an earlier run's outputs in `out_dir` (refused without it).

    Returns:
        The summary written to `summary.json` (identical on every process).
    """
    state = PartialState()
    weights = dict(rewards) if rewards else dict(config.eval_reward_fn)
    check_reward_names(weights)  # before any model is loaded
    plan = plan_sampling(config, request)
    check_model_inputs(config, request.lora, request.lora_scale)
    out = Path(out_dir)
    claim_output_dir(out, overwrite, remove=state.is_main_process)
    image_dir = out / "images"
    if state.is_main_process:  # before the model loads: an --out that cannot be written fails in seconds
        out.mkdir(parents=True, exist_ok=True)
        if save_images:
            image_dir.mkdir(exist_ok=True)
    state.wait_for_everyone()
    reward = build_reward(weights, state.device, config.reward_options.to_dict())  # a missing weights file fails first
    loaded = load_model(config, state.device, request.lora, request.lora_scale)

    def write_pngs(chunk: list[ImageJob], images: torch.Tensor, scores: Mapping[str, torch.Tensor]) -> None:
        for job, image in zip(chunk, images):
            save_png(image, image_dir / job.filename)

    result = evaluate(
        loaded.adapter,
        reward,
        plan.jobs,
        config.sample,
        collect_records=True,
        on_batch=write_pngs if save_images else None,
        progress=state.is_local_main_process,
    )
    names = [*reward.names, AVERAGE_KEY]
    records = result.records
    if save_images:
        for record in records:
            record["image"] = f"images/{image_filename(record['prompt_index'], record['image_index'])}"
    summary = {
        "count": len(records),
        "rewards": summarize_scores(records, names),
        "details": {name: result.means[name] for name in reward.detail_names},
        "weights": weights,
        "settings": sampling_settings(config, loaded, plan),
        "scores_csv": "scores.csv",
    }
    if state.is_main_process:
        write_scores_csv(out / "scores.csv", records, [*names, *reward.detail_names])
        write_json(out / "summary.json", summary)
        logger.info(f"evaluated {len(records)} images: " + ", ".join(f"{n} {summary['rewards'][n]['mean']:.4f}" for n in names))
    state.wait_for_everyone()
    return summary
