"""Evaluation and image generation with a trained LoRA checkpoint or the base model.

Shared by `scripts/evaluate.py` (score ODE samples with any set of rewards, write a JSON summary and
a CSV of per-image scores) and `scripts/generate.py` (write PNG files and an index). Both read the
model, resolution, steps, guidance and seed from a training preset (`config/grpo.py:<preset>`), so a
checkpoint is evaluated with the settings it was trained with unless a `--config.*` override says
otherwise.

Every image has its own seed derived from `(config.seed, prompt index, image index)`, so an image
does not depend on the batch size or on the number of processes that share the work.

Checkpoints are the `.../checkpoints/epoch_XXXXX/lora` directories the trainer writes (diffusers
LoRA format with adapter metadata, so `load_lora_weights` restores the trained rank and alpha).
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np
import torch
from accelerate import PartialState
from accelerate.logging import get_logger
from accelerate.utils import gather_object
from PIL import Image
from tqdm.auto import tqdm

from flow_grpo.config_checks import check_model_and_resolution
from flow_grpo.data import Prompt, dataset_paths, load_prompts
from flow_grpo.models import ModelAdapter, load_adapter
from flow_grpo.rewards import AVERAGE_KEY, MultiReward, build_reward, check_reward_names
from flow_grpo.sampling import sample_ode

__all__ = [
    "LORA_WEIGHTS_FILE",
    "ImageJob",
    "LoadedModel",
    "check_sampling_config",
    "compute_dtype",
    "find_lora_dir",
    "generate_batches",
    "image_seed",
    "load_model",
    "parse_reward_weights",
    "plan_jobs",
    "resolve_prompts",
    "run_evaluation",
    "run_generation",
    "save_png",
    "summarize_scores",
    "write_scores_csv",
]

logger = get_logger(__name__)

LORA_WEIGHTS_FILE = "pytorch_lora_weights.safetensors"
"""File name the trainer (diffusers' `save_lora_weights`) gives the LoRA weights."""

ADAPTER_NAME = "checkpoint"
"""Adapter name of the loaded LoRA in the pipeline."""

_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


# ---------------------------------------------------------------------------- arguments


def parse_reward_weights(spec: str) -> dict[str, float]:
    """Parse `"pickscore:1,aesthetic:0.5"` into `{"pickscore": 1.0, "aesthetic": 0.5}`.

    A name without `:weight` gets weight 1; an empty or blank spec gives `{}` (use the config's
    rewards). Names are checked against the registry when the rewards are built.

    Raises:
        ValueError: on an empty name, a weight that is not a finite number, or a repeated name.
    """
    weights: dict[str, float] = {}
    for item in spec.split(","):
        item = item.strip()
        if not item:
            continue
        name, _, weight_text = item.partition(":")
        name = name.strip()
        if not name:
            raise ValueError(f"reward entry {item!r} has no name; write name:weight, e.g. pickscore:1")
        try:
            weight = float(weight_text) if weight_text.strip() else 1.0
        except ValueError:
            raise ValueError(f"reward {name!r} has weight {weight_text!r}, which is not a number") from None
        if not math.isfinite(weight):
            raise ValueError(f"reward {name!r} has a non-finite weight {weight_text!r}")
        if name in weights:
            raise ValueError(f"reward {name!r} is given twice in {spec!r}")
        weights[name] = weight
    return weights


def resolve_prompts(
    source: str,
    *,
    dataset: str,
    split: str = "test",
    texts: Sequence[str] = (),
    max_prompts: int = 0,
) -> tuple[list[Prompt], str]:
    """The prompts to sample and a description of where they came from.

    Args:
        source: a `.txt` / `.jsonl` prompt file or a dataset directory; empty = `dataset`.
        dataset: the config's dataset directory (the fallback).
        split: split looked up in a dataset directory (`{split}_metadata.jsonl` or `{split}.txt`).
        texts: prompts given directly; when non-empty, `source` and `dataset` are ignored.
        max_prompts: keep only the first this many prompts; 0 keeps all.
    """
    if max_prompts < 0:
        raise ValueError(f"max_prompts must be 0 (all) or positive, got {max_prompts}")
    if texts:
        prompts = [Prompt(text.strip(), {}) for text in texts if text.strip()]
        if not prompts:
            raise ValueError("every prompt given on the command line is blank")
        origin = "command line"
    else:
        path = Path(source or dataset)
        if path.is_dir():
            path = dataset_paths(path, split)
        prompts = load_prompts(path)
        origin = str(path)
    if max_prompts:
        prompts = prompts[:max_prompts]
    return prompts, origin


# ------------------------------------------------------------------------------ seeding


@dataclass(frozen=True)
class ImageJob:
    """One image to sample: prompt `prompt_index` (in the prompt list), sample `image_index` of it."""

    prompt_index: int
    image_index: int
    text: str
    seed: int
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def filename(self) -> str:
        """PNG file name of the image, unique per (prompt, sample)."""
        return f"{self.prompt_index:05d}_{self.image_index:02d}.png"


def image_seed(seed: int, prompt_index: int, image_index: int) -> int:
    """A 63-bit seed of one image, stable across runs, batch sizes and process counts."""
    digest = hashlib.sha256(f"image:{seed}:{prompt_index}:{image_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def plan_jobs(prompts: Sequence[Prompt], images_per_prompt: int, seed: int) -> list[ImageJob]:
    """Every image to sample, ordered by prompt then sample index."""
    if images_per_prompt < 1:
        raise ValueError(f"images per prompt must be at least 1, got {images_per_prompt}")
    return [
        ImageJob(p, i, prompt.text, image_seed(seed, p, i), dict(prompt.metadata))
        for p, prompt in enumerate(prompts)
        for i in range(images_per_prompt)
    ]


# ------------------------------------------------------------------------------- model


def compute_dtype(config: ml_collections.ConfigDict, device: torch.device) -> torch.dtype:
    """The weight dtype for sampling: `config.mixed_precision` on CUDA, float32 elsewhere."""
    if config.mixed_precision not in _DTYPES:
        raise ValueError(f"config.mixed_precision must be one of {sorted(_DTYPES)}, got {config.mixed_precision!r}")
    dtype = _DTYPES[config.mixed_precision]
    if device.type != "cuda" and dtype != torch.float32:
        logger.info(f"sampling in float32 on {device.type} (config.mixed_precision={config.mixed_precision} is for CUDA)")
        return torch.float32
    return dtype


def find_lora_dir(path: str | os.PathLike[str]) -> Path:
    """The directory holding `pytorch_lora_weights.safetensors`: `path` itself, `path/lora`, or the file's parent.

    Raises:
        FileNotFoundError: naming what was looked for.
    """
    path = Path(path).expanduser()
    if path.is_file() and path.name == LORA_WEIGHTS_FILE:
        return path.parent
    for candidate in (path, path / "lora"):
        if (candidate / LORA_WEIGHTS_FILE).is_file():
            return candidate
    raise FileNotFoundError(
        f"no LoRA checkpoint at {path}: looked for {path / LORA_WEIGHTS_FILE} and {path / 'lora' / LORA_WEIGHTS_FILE}. "
        "Pass a checkpoint directory written by the trainer, e.g. logs/<run>/checkpoints/epoch_00299/lora."
    )


@dataclass
class LoadedModel:
    """A model adapter ready for sampling, with a description of the loaded LoRA (if any)."""

    adapter: ModelAdapter
    lora: str | None
    lora_scale: float | None  # the adapter weight of the LoRA (1.0 = as saved); None without a LoRA


def check_sampling_config(config: ml_collections.ConfigDict) -> None:
    """Fail early, naming the key, on settings that cannot sample (before any weight is loaded).

    The model and resolution checks are `check_model_and_resolution` (raising `ConfigError`, a
    `ValueError`); the dataset is not required.
    """
    for key in ("eval_num_steps", "eval_batch_size"):
        value = config.sample[key]
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"config.sample.{key} must be a positive integer, got {value!r}")
    check_model_and_resolution(config)


def load_model(
    config: ml_collections.ConfigDict, device: torch.device, lora: str | None = None, scale: float = 1.0
) -> LoadedModel:
    """Load the pipeline of `config.pretrained` on `device`, and the LoRA checkpoint `lora` if given.

    The checkpoint's adapter metadata restores its trained rank and alpha. `scale` multiplies the
    LoRA's effect (adapter weight); 1.0 uses it as saved.
    """
    check_sampling_config(config)
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"the LoRA scale must be a positive number, got {scale}")
    lora_dir = find_lora_dir(lora) if lora else None  # fail on a bad path before loading the model
    adapter = load_adapter(config, device, compute_dtype(config, device))
    if lora_dir is None:
        return LoadedModel(adapter, None, None)
    adapter.pipeline.load_lora_weights(str(lora_dir), adapter_name=ADAPTER_NAME)
    if scale != 1.0:
        adapter.pipeline.set_adapters([ADAPTER_NAME], adapter_weights=[scale])
    adapter.transformer.requires_grad_(False)
    logger.info(f"loaded LoRA {lora_dir} with scale {scale:g}")
    return LoadedModel(adapter, str(lora_dir), scale)


# ----------------------------------------------------------------------------- sampling


def generate_batches(
    adapter: ModelAdapter,
    jobs: Sequence[ImageJob],
    *,
    num_steps: int,
    resolution: int,
    batch_size: int,
    max_states_per_call: int = 0,
    progress: bool = False,
) -> Iterator[tuple[list[ImageJob], torch.Tensor]]:
    """ODE-sample `jobs` in batches; yields `(jobs of the batch, images (B, 3, H, W) float32 in [0, 1])`."""
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    device = adapter.device
    autocast = torch.autocast(device.type, dtype=adapter.dtype, enabled=adapter.dtype != torch.float32)
    starts = range(0, len(jobs), batch_size)
    for start in tqdm(starts, desc="sampling", disable=not progress, leave=False):
        chunk = list(jobs[start : start + batch_size])
        generators = [torch.Generator(device).manual_seed(job.seed) for job in chunk]
        with torch.no_grad(), autocast:
            images = sample_ode(
                adapter,
                adapter.encode_prompts([job.text for job in chunk]),
                num_steps=num_steps,
                resolution=resolution,
                generator=generators,
                max_states_per_call=max_states_per_call,
            )
        yield chunk, images.float()


def save_png(image: torch.Tensor, path: str | os.PathLike[str]) -> None:
    """Write one image `(3, H, W)` in [0, 1] as an 8-bit PNG."""
    pixels = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    Image.fromarray(pixels).save(path, format="PNG")


# ----------------------------------------------------------------------------- reports


def summarize_scores(records: Sequence[Mapping[str, Any]], names: Sequence[str]) -> dict[str, dict[str, float]]:
    """Per reward name: mean, population std, min and max over the records."""
    summary = {}
    for name in names:
        values = np.asarray([record[name] for record in records], dtype=np.float64)
        summary[name] = {
            "mean": float(values.mean()),
            "std": float(values.std()),
            "min": float(values.min()),
            "max": float(values.max()),
        }
    return summary


def write_scores_csv(path: str | os.PathLike[str], records: Sequence[Mapping[str, Any]], names: Sequence[str]) -> None:
    """One row per image: prompt index, sample index, seed, prompt, [image file,] one column per reward."""
    columns = ["prompt_index", "image_index", "seed", "prompt"]
    if records and "image" in records[0]:
        columns.append("image")
    columns += list(names)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for record in records:
            writer.writerow({key: record[key] for key in columns})


def _write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _sampling_settings(
    config: ml_collections.ConfigDict, loaded: LoadedModel, prompts_origin: str, num_prompts: int, images_per_prompt: int
) -> dict[str, Any]:
    return {
        "model": config.pretrained.model,
        "family": config.pretrained.family,
        "lora": loaded.lora,
        "lora_scale": loaded.lora_scale,
        "prompts": prompts_origin,
        "num_prompts": num_prompts,
        "images_per_prompt": images_per_prompt,
        "num_steps": config.sample.eval_num_steps,
        "guidance_scale": config.sample.guidance_scale,
        "resolution": config.sample.resolution,
        "batch_size": config.sample.eval_batch_size,
        "seed": config.seed,
        "dtype": str(loaded.adapter.dtype).removeprefix("torch."),
        "num_processes": PartialState().num_processes,
    }


def _sorted(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(records, key=lambda record: (record["prompt_index"], record["image_index"]))


def run_evaluation(
    config: ml_collections.ConfigDict,
    out_dir: str | os.PathLike[str],
    *,
    lora: str | None = None,
    lora_scale: float = 1.0,
    prompts: str = "",
    texts: Sequence[str] = (),
    split: str = "test",
    rewards: Mapping[str, float] | None = None,
    images_per_prompt: int = 1,
    max_prompts: int = 0,
    save_images: bool = False,
) -> dict[str, Any]:
    """Sample the prompts with the ODE sampler, score every image, write `summary.json` and `scores.csv`.

    Work is split over the processes of `PartialState()` (each image is computed exactly once) and the
    main process writes the reports. Settings come from `config` (`sample.eval_num_steps`,
    `sample.guidance_scale`, `sample.resolution`, `sample.eval_batch_size`, `seed`).

    Args:
        config: a training config (preset plus overrides).
        out_dir: directory for `summary.json`, `scores.csv` (and `images/` with `save_images`).
        lora: LoRA checkpoint directory; None evaluates the base model.
        lora_scale: adapter weight of the LoRA (multiplies its effect); 1.0 = as saved.
        prompts, texts, split, max_prompts: see `resolve_prompts` (default: the config's test split).
        rewards: reward name -> weight; None or empty uses `config.eval_reward_fn`.
        images_per_prompt: samples per prompt, each with its own seed.
        save_images: also write every image as a PNG.

    Returns:
        The summary written to `summary.json` (identical on every process).
    """
    state = PartialState()
    weights = dict(rewards) if rewards else dict(config.eval_reward_fn)
    check_reward_names(weights)  # before any model is loaded
    prompt_list, origin = resolve_prompts(prompts, dataset=config.dataset, split=split, texts=texts, max_prompts=max_prompts)
    jobs = plan_jobs(prompt_list, images_per_prompt, config.seed)
    loaded = load_model(config, state.device, lora, lora_scale)
    reward: MultiReward = build_reward(weights, state.device, config.reward_options.to_dict())
    names = [*reward.names, AVERAGE_KEY]
    out = Path(out_dir)
    image_dir = out / "images"
    if state.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        if save_images:
            image_dir.mkdir(exist_ok=True)
    state.wait_for_everyone()

    local: list[dict[str, Any]] = []
    batches = generate_batches(
        loaded.adapter,
        jobs[state.process_index :: state.num_processes],
        num_steps=config.sample.eval_num_steps,
        resolution=config.sample.resolution,
        batch_size=config.sample.eval_batch_size,
        max_states_per_call=config.sample.max_states_per_call,
        progress=state.is_local_main_process,
    )
    for chunk, images in batches:
        scores = reward(images, [job.text for job in chunk], [job.metadata for job in chunk])
        for row, job in enumerate(chunk):
            record: dict[str, Any] = {
                "prompt_index": job.prompt_index,
                "image_index": job.image_index,
                "seed": job.seed,
                "prompt": job.text,
            }
            if save_images:
                save_png(images[row], image_dir / job.filename)
                record["image"] = f"images/{job.filename}"
            record.update({name: float(scores[name][row]) for name in names})
            local.append(record)

    records = _sorted(gather_object(local))
    summary = {
        "count": len(records),
        "rewards": summarize_scores(records, names),
        "weights": weights,
        "settings": _sampling_settings(config, loaded, origin, len(prompt_list), images_per_prompt),
        "scores_csv": "scores.csv",
    }
    if state.is_main_process:
        write_scores_csv(out / "scores.csv", records, names)
        _write_json(out / "summary.json", summary)
        logger.info(f"evaluated {len(records)} images: " + ", ".join(f"{n} {summary['rewards'][n]['mean']:.4f}" for n in names))
    state.wait_for_everyone()
    return summary


def run_generation(
    config: ml_collections.ConfigDict,
    out_dir: str | os.PathLike[str],
    *,
    lora: str | None = None,
    lora_scale: float = 1.0,
    prompts: str = "",
    texts: Sequence[str] = (),
    split: str = "test",
    images_per_prompt: int = 1,
    max_prompts: int = 0,
) -> list[dict[str, Any]]:
    """Sample the prompts and write `images/<prompt>_<sample>.png`, `index.jsonl` and `settings.json`.

    `index.jsonl` has one line per image (file, prompt index, sample index, seed, prompt, metadata),
    ordered by prompt then sample. Arguments as in `run_evaluation`. Returns the index rows.
    """
    state = PartialState()
    prompt_list, origin = resolve_prompts(prompts, dataset=config.dataset, split=split, texts=texts, max_prompts=max_prompts)
    jobs = plan_jobs(prompt_list, images_per_prompt, config.seed)
    loaded = load_model(config, state.device, lora, lora_scale)
    out = Path(out_dir)
    image_dir = out / "images"
    if state.is_main_process:
        image_dir.mkdir(parents=True, exist_ok=True)
    state.wait_for_everyone()

    local = []
    batches = generate_batches(
        loaded.adapter,
        jobs[state.process_index :: state.num_processes],
        num_steps=config.sample.eval_num_steps,
        resolution=config.sample.resolution,
        batch_size=config.sample.eval_batch_size,
        max_states_per_call=config.sample.max_states_per_call,
        progress=state.is_local_main_process,
    )
    for chunk, images in batches:
        for row, job in enumerate(chunk):
            save_png(images[row], image_dir / job.filename)
            local.append(
                {
                    "file": f"images/{job.filename}",
                    "prompt_index": job.prompt_index,
                    "image_index": job.image_index,
                    "seed": job.seed,
                    "prompt": job.text,
                    "metadata": job.metadata,
                }
            )

    index = _sorted(gather_object(local))
    if state.is_main_process:
        with open(out / "index.jsonl", "w", encoding="utf-8") as f:
            for entry in index:
                f.write(json.dumps(entry, ensure_ascii=False) + "\n")
        _write_json(out / "settings.json", _sampling_settings(config, loaded, origin, len(prompt_list), images_per_prompt))
        logger.info(f"wrote {len(index)} images to {image_dir}")
    state.wait_for_everyone()
    return index
