"""Generate and score the paper's benchmarks for the base model and any number of checkpoints.

Layout under the output directory::

    <row>/<benchmark>/images/PPPPP_II.png   one image per (prompt, sample), seeds fixed per prompt
    <row>/<benchmark>/generation.json       what produced the images (model, LoRA, steps, CFG, seed, prompts)
    <row>/<benchmark>/scores.csv            one row per image, one column per reward

Generation comes first, for every row: an image whose PNG exists is not generated again (PNGs are
written under a temporary name and renamed, so a cut-off run leaves no half-written image), and a
row whose images all exist does not even load its model. `generation.json` guards the resume: images
made with other settings are refused, naming the setting. Scoring then reads every image back from
its PNG (the 8-bit image, as GenEval's official evaluator does), so a resumed evaluation scores the
same pixels as an uninterrupted one. Every image's seed depends only on `(config.seed, prompt index,
sample index)` (`flow_grpo.sampling.generation.image_seed`), so every row sees the same initial noise.
"""

from __future__ import annotations

import gc
import hashlib
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np
import torch
from accelerate import PartialState
from accelerate.logging import get_logger
from accelerate.utils import gather_object
from PIL import Image

from flow_grpo.command_flags import InputNotFoundError, InputValueError
from flow_grpo.data import load_prompts
from flow_grpo.sampling.generation import ImageJob, compute_dtype, config_batches, find_lora_dir, load_model, plan_jobs, sort_records
from flow_grpo.run.outputs import save_png, write_json, write_scores_csv
from flow_grpo.paper.geneval_table import GenEvalSummary, summarize_geneval
from flow_grpo.paper.suite import BENCHMARKS, Benchmark, Metric
from flow_grpo.rewards import MultiReward, build_reward, check_reward_names

__all__ = [
    "BASE_ROW",
    "Row",
    "RowResult",
    "benchmark_jobs",
    "build_metric_rewards",
    "generate_row",
    "parse_rows",
    "run_paper_evaluation",
    "score_row",
]

logger = get_logger(__name__)

BASE_ROW = "base"
"""`--checkpoint base` evaluates the base model (no LoRA)."""

_UNCHECKED_SETTINGS = ("prompts", "num_prompts", "batch_size", "num_processes")
"""Settings that do not change an image, so a resume may differ in them."""


@dataclass(frozen=True)
class Row:
    """One row of the table: its name and the LoRA checkpoint (None: the base model)."""

    name: str
    lora: str | None

    @property
    def folder(self) -> str:
        """The row's directory name: its name with characters other than letters, digits, `.-_` replaced by `_`."""
        return re.sub(r"[^A-Za-z0-9._-]+", "_", self.name).strip("_") or "row"


@dataclass
class RowResult:
    """One row's numbers: metric name -> value, and its GenEval table when GenEval was scored."""

    values: dict[str, float]
    geneval: GenEvalSummary | None = None


def parse_rows(checkpoints: Sequence[str]) -> list[Row]:
    """Rows from `--checkpoint` values: `base`, a checkpoint path, or `NAME=PATH`.

    A path's default name is its run and epoch (`<run>/epoch_00299` for `logs/<run>/checkpoints/epoch_00299/lora`).

    Raises:
        InputValueError: no checkpoint or a repeated name (a `ValueError`).
        InputNotFoundError: a missing LoRA, naming what was looked for (a `FileNotFoundError`).
    """
    if not checkpoints:
        raise InputValueError("give at least one --checkpoint: base, a LoRA checkpoint directory, or NAME=PATH")
    rows = []
    for value in checkpoints:
        name, sep, path = value.partition("=")
        if not sep:
            name, path = "", value
        if path == BASE_ROW:
            rows.append(Row(name or BASE_ROW, None))
            continue
        lora_dir = find_lora_dir(path)
        parts = [part for part in lora_dir.parts if part not in ("lora", "checkpoints")]
        rows.append(Row(name or "/".join(parts[-2:]), str(lora_dir)))
    names = [row.name for row in rows]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated or len({row.folder for row in rows}) != len(rows):
        raise InputValueError(f"two --checkpoint rows share a name {repeated or names}; name them with NAME=PATH")
    return rows


def benchmark_jobs(
    config: ml_collections.ConfigDict, benchmark: Benchmark, dataset_root: str | os.PathLike[str], max_prompts: int = 0
) -> tuple[list[ImageJob], Path]:
    """Every image of `benchmark` (its first `max_prompts` prompts; 0 = all) with its seed, and the prompt file."""
    path = Path(dataset_root) / benchmark.prompts
    if not path.is_file():
        raise InputNotFoundError(
            f"benchmark {benchmark.name} reads {path}, which does not exist; run "
            f"`flow-grpo-prepare-data --source published --out {dataset_root}` or pass --dataset_root"
        )
    prompts = load_prompts(path)
    if max_prompts:
        prompts = prompts[:max_prompts]
    return plan_jobs(prompts, benchmark.images_per_prompt, config.seed), path


def _settings(
    config: ml_collections.ConfigDict, row: Row, lora_scale: float, path: Path, benchmark: Benchmark, num_jobs: int
) -> dict[str, Any]:
    """What produces a benchmark's images (written to `generation.json`, compared on resume)."""
    return {
        "model": config.pretrained.model,
        "family": config.pretrained.family,
        "lora": row.lora,
        "lora_scale": lora_scale if row.lora else None,
        "prompts": str(path),
        "prompts_sha1": hashlib.sha1(path.read_bytes()).hexdigest(),
        "num_prompts": num_jobs // benchmark.images_per_prompt,
        "images_per_prompt": benchmark.images_per_prompt,
        "num_steps": config.sample.eval_num_steps,
        "guidance_scale": config.sample.guidance_scale,
        "resolution": config.sample.resolution,
        "seed": config.seed,
        "dtype": str(compute_dtype(config, PartialState().device)).removeprefix("torch."),
        "batch_size": config.sample.eval_batch_size,
        "num_processes": PartialState().num_processes,
    }


def _check_resume(record_path: Path, settings: Mapping[str, Any]) -> None:
    """Refuse to add to images that were made with other settings, naming the first one that differs."""
    if not record_path.is_file():
        return
    previous = json.loads(record_path.read_text(encoding="utf-8"))
    for key, value in settings.items():
        if key not in _UNCHECKED_SETTINGS and previous.get(key) != value:
            raise InputValueError(
                f"{record_path.parent} holds images made with {key} = {previous.get(key)!r}, but this evaluation "
                f"uses {value!r}; use another --out, or delete {record_path.parent} to regenerate them"
            )


def _save_atomic(image: torch.Tensor, path: Path) -> None:
    partial = path.with_name(path.name + ".partial")
    save_png(image, partial)
    os.replace(partial, path)


def generate_row(
    config: ml_collections.ConfigDict,
    row: Row,
    plans: Mapping[str, tuple[list[ImageJob], Path]],
    out_dir: Path,
    lora_scale: float = 1.0,
) -> int:
    """Generate the images of `row` for every benchmark in `plans` that are not on disk yet; returns how many.

    Every process must call this; the missing images are dealt round-robin to the processes.
    """
    state = PartialState()
    missing: dict[str, list[ImageJob]] = {}
    for name, (jobs, path) in plans.items():
        folder = out_dir / row.folder / name
        settings = _settings(config, row, lora_scale, path, BENCHMARKS[name], len(jobs))
        _check_resume(folder / "generation.json", settings)
        state.wait_for_everyone()
        if state.is_main_process:
            (folder / "images").mkdir(parents=True, exist_ok=True)
            write_json(folder / "generation.json", settings)
        missing[name] = [job for job in jobs if not (folder / "images" / job.filename).is_file()]
    state.wait_for_everyone()
    total = sum(len(jobs) for jobs in missing.values())
    logger.info(f"{row.name}: {total} images to generate" + (" (the others are on disk)" if total else ""))
    if not total:
        return 0
    loaded = load_model(config, state.device, row.lora, lora_scale)
    for name, jobs in missing.items():
        image_dir = out_dir / row.folder / name / "images"
        own = jobs[state.process_index :: state.num_processes]
        for chunk, images in config_batches(loaded.adapter, own, config.sample, progress=state.is_local_main_process):
            for job, image in zip(chunk, images):
                _save_atomic(image, image_dir / job.filename)
    del loaded
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    state.wait_for_everyone()
    return total


def _load_png(path: Path) -> torch.Tensor:
    """An image file as uint8 `(3, H, W)`."""
    with Image.open(path) as image:
        return torch.from_numpy(np.asarray(image.convert("RGB")).copy()).permute(2, 0, 1)


def _score_benchmark(reward: MultiReward, jobs: Sequence[ImageJob], image_dir: Path, batch_size: int) -> list[dict[str, Any]]:
    """Score this process's share of the images of one benchmark; gathers every process's records."""
    state = PartialState()
    own = list(jobs[state.process_index :: state.num_processes])
    local = []
    for start in range(0, len(own), batch_size):
        chunk = own[start : start + batch_size]
        images = torch.stack([_load_png(image_dir / job.filename) for job in chunk])
        scores = reward(images, [job.text for job in chunk], [job.metadata for job in chunk])
        for row, job in enumerate(chunk):
            record = {"prompt_index": job.prompt_index, "image_index": job.image_index, "seed": job.seed,
                      "prompt": job.text, "tag": job.metadata.get("tag", ""), "image": f"images/{job.filename}"}
            local.append(record | {name: float(scores[name][row]) for name in reward.names})
    return sort_records(gather_object(local))


def _mean(records: Sequence[Mapping[str, Any]], key: str, label: str) -> float:
    values = np.asarray([record[key] for record in records], dtype=np.float64)
    finite = np.isfinite(values)
    if not finite.all():
        logger.warning(f"{label}: {int((~finite).sum())} of {len(values)} scores are NaN or infinite; left out of the mean")
    return float(values[finite].mean()) if finite.any() else math.nan


def score_row(
    row: Row,
    metrics: Sequence[Metric],
    plans: Mapping[str, tuple[list[ImageJob], Path]],
    rewards: MultiReward,
    out_dir: Path,
    batch_size: int,
) -> RowResult:
    """Score `row`'s images with every metric, write each benchmark's `scores.csv`, return the row's numbers."""
    state = PartialState()
    result = RowResult({})
    for name in plans:
        needed = [metric for metric in metrics if metric.benchmark == name]
        names = list(dict.fromkeys(metric.reward for metric in needed))
        folder = out_dir / row.folder / name
        records = _score_benchmark(rewards.select({reward: 1.0 for reward in names}), plans[name][0], folder / "images", batch_size)
        if state.is_main_process:
            write_scores_csv(folder / "scores.csv", records, names)
        for metric in needed:
            if metric.geneval:
                result.geneval = summarize_geneval(records, score_key=metric.reward)
                result.values[metric.name] = result.geneval.overall
            else:
                result.values[metric.name] = metric.scale * _mean(records, metric.reward, f"{row.name} {metric.label}")
    return result


def build_metric_rewards(metrics: Sequence[Metric], device: torch.device, options: Mapping[str, Mapping[str, Any]]) -> MultiReward:
    """Build every reward the metrics use once (weights 1; the table reads each raw score)."""
    names = list(dict.fromkeys(metric.reward for metric in metrics))
    check_reward_names(names)
    return build_reward({name: 1.0 for name in names}, device, {name: options[name] for name in names if name in options})


def run_paper_evaluation(
    config: ml_collections.ConfigDict,
    out_dir: str | os.PathLike[str],
    rows: Sequence[Row],
    metrics: Sequence[Metric],
    *,
    dataset_root: str | os.PathLike[str] = "dataset",
    reward_options: Mapping[str, Mapping[str, Any]] | None = None,
    max_prompts: int = 0,
    lora_scale: float = 1.0,
) -> tuple[dict[str, RowResult], dict[str, Any]]:
    """Generate every row's missing images, then score all of them; returns `(row name -> numbers, settings)`.

    Every process must call this (generation and scoring are split over the processes of `PartialState()`).
    The benchmarks are those the metrics use; the rewards are built once, after all generation, so
    the generator and the reward models are never in memory together.
    """
    out = Path(out_dir)
    names = list(dict.fromkeys(metric.benchmark for metric in metrics))
    check_reward_names([metric.reward for metric in metrics])  # before any model is loaded
    plans = {name: benchmark_jobs(config, BENCHMARKS[name], dataset_root, max_prompts) for name in names}
    for row in rows:
        generate_row(config, row, plans, out, lora_scale)
    rewards = build_metric_rewards(metrics, PartialState().device, reward_options or {})
    results = {row.name: score_row(row, metrics, plans, rewards, out, config.sample.eval_batch_size) for row in rows}
    settings = {
        "model": config.pretrained.model,
        "num_steps": config.sample.eval_num_steps,
        "guidance_scale": config.sample.guidance_scale,
        "resolution": config.sample.resolution,
        "seed": config.seed,
        "checkpoints": {row.name: row.lora for row in rows},
        "dataset_root": str(dataset_root),
        "max_prompts": max_prompts,
        "lora_scale": lora_scale,
        "images": {name: len(jobs) for name, (jobs, _) in plans.items()},
    }
    return results, settings
