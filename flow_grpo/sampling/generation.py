"""Load a model (and a trained LoRA) for sampling, plan per-image seeds, ODE-sample in batches.

Shared by the trainer's periodic evaluation (`flow_grpo.sampling.evaluation`), `scripts/evaluate.py` and
`scripts/generate.py`. The tools read the model, resolution, steps, guidance and seed from a
training preset (`config/grpo.py:<preset>`), so a checkpoint is sampled with the settings it was
trained with unless a `--config.*` override says otherwise.

Every image has its own seed derived from `(config.seed, prompt index, image index)`, so an image
does not depend on the batch size or on the number of processes that share the work.

Checkpoints are the `.../checkpoints/epoch_XXXXX/lora` directories the trainer writes (diffusers
LoRA format with adapter metadata, so `load_lora_weights` restores the trained rank and alpha).
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ml_collections
import torch
from accelerate import PartialState
from accelerate.logging import get_logger
from accelerate.utils import gather_object
from tqdm.auto import tqdm

from flow_grpo.command_flags import InputNotFoundError, InputValueError
from flow_grpo.run.config_checks import ConfigError, check_model_and_resolution
from flow_grpo.data import Prompt, resolve_prompts
from flow_grpo.models import ModelAdapter, load_adapter
from flow_grpo.run.outputs import claim_output_dir, save_png, write_json, write_jsonl
from flow_grpo.precision import mixed_precision_dtype
from flow_grpo.sampling.rollouts import sample_ode
from flow_grpo.seeding import stable_seed

__all__ = [
    "LORA_WEIGHTS_FILE",
    "ImageJob",
    "LoadedModel",
    "SamplingPlan",
    "SamplingRequest",
    "check_model_inputs",
    "check_sampling_config",
    "config_batches",
    "compute_dtype",
    "find_lora_dir",
    "generate_batches",
    "image_filename",
    "image_seed",
    "load_model",
    "plan_jobs",
    "plan_sampling",
    "run_generation",
    "sampling_settings",
    "sort_records",
]

logger = get_logger(__name__)

LORA_WEIGHTS_FILE = "pytorch_lora_weights.safetensors"
"""File name the trainer (diffusers' `save_lora_weights`) gives the LoRA weights."""

ADAPTER_NAME = "checkpoint"
"""Adapter name of the loaded LoRA in the pipeline."""

AutocastFactory = Callable[[], contextlib.AbstractContextManager]
"""Returns a fresh autocast context for one sampling call (e.g. `Accelerator.autocast`)."""


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
        return image_filename(self.prompt_index, self.image_index)


def image_filename(prompt_index: int, image_index: int) -> str:
    """PNG file name of sample `image_index` of prompt `prompt_index`: `PPPPP_II.png`."""
    return f"{prompt_index:05d}_{image_index:02d}.png"


def image_seed(seed: int, prompt_index: int, image_index: int) -> int:
    """A 63-bit seed of one image, stable across runs, batch sizes and process counts."""
    return stable_seed(f"image:{seed}:{prompt_index}:{image_index}")


def plan_jobs(prompts: Sequence[Prompt], images_per_prompt: int, seed: int) -> list[ImageJob]:
    """Every image to sample, ordered by prompt then sample index."""
    if images_per_prompt < 1:
        raise ValueError(f"images per prompt must be at least 1, got {images_per_prompt}")
    return [
        ImageJob(p, i, prompt.text, image_seed(seed, p, i), dict(prompt.metadata))
        for p, prompt in enumerate(prompts)
        for i in range(images_per_prompt)
    ]


@dataclass(frozen=True)
class SamplingPlan:
    """The images a tool samples and where their prompts came from."""

    jobs: list[ImageJob]
    origin: str
    num_prompts: int
    images_per_prompt: int


@dataclass(frozen=True)
class SamplingRequest:
    """What a sampling tool draws (`scripts/generate.py`, `scripts/evaluate.py`): LoRA and prompts.

    `prompts`, `texts`, `split` and `max_prompts` as in `flow_grpo.data.resolve_prompts` (default: the
    config's test split); `lora` None samples the base model; `lora_scale` multiplies the LoRA's
    effect (1.0 = as saved); every one of the `images_per_prompt` samples has its own seed.
    """

    lora: str | None = None
    lora_scale: float = 1.0
    prompts: str = ""
    texts: Sequence[str] = ()
    split: str = "test"
    images_per_prompt: int = 1
    max_prompts: int = 0

    @property
    def reads_dataset(self) -> bool:
        """Whether the prompts come from the config's dataset directory (neither a file nor texts given)."""
        return not (self.prompts or self.texts)


def plan_sampling(config: ml_collections.ConfigDict, request: SamplingRequest) -> SamplingPlan:
    """Resolve the request's prompts (see `flow_grpo.data.resolve_prompts`) and plan every image with its seed."""
    images_per_prompt = request.images_per_prompt
    prompt_list, origin = resolve_prompts(
        request.prompts, dataset=config.dataset, split=request.split, texts=request.texts, max_prompts=request.max_prompts
    )
    return SamplingPlan(plan_jobs(prompt_list, images_per_prompt, config.seed), origin, len(prompt_list), images_per_prompt)


# ------------------------------------------------------------------------------- model


def compute_dtype(config: ml_collections.ConfigDict, device: torch.device) -> torch.dtype:
    """The weight dtype for sampling: `config.mixed_precision` on CUDA, float32 elsewhere."""
    dtype = mixed_precision_dtype(config.mixed_precision)
    if device.type != "cuda" and dtype != torch.float32:
        logger.info(f"sampling in float32 on {device.type} (config.mixed_precision={config.mixed_precision} is for CUDA)")
        return torch.float32
    return dtype


def find_lora_dir(path: str | os.PathLike[str]) -> Path:
    """The directory holding `pytorch_lora_weights.safetensors`: `path` itself, `path/lora`, or the file's parent.

    Raises:
        InputNotFoundError: naming what was looked for (a `FileNotFoundError`).
    """
    path = Path(path).expanduser()
    if path.is_file() and path.name == LORA_WEIGHTS_FILE:
        return path.parent
    for candidate in (path, path / "lora"):
        if (candidate / LORA_WEIGHTS_FILE).is_file():
            return candidate
    raise InputNotFoundError(
        f"no LoRA checkpoint at {path}: looked for {path / LORA_WEIGHTS_FILE} and {path / 'lora' / LORA_WEIGHTS_FILE}; "
        "pass a checkpoint directory written by the trainer, e.g. logs/<run>/checkpoints/epoch_00299/lora"
    )


@dataclass
class LoadedModel:
    """A model adapter ready for sampling, with a description of the loaded LoRA (if any)."""

    adapter: ModelAdapter
    lora: str | None
    lora_scale: float | None  # the adapter weight of the LoRA (1.0 = as saved); None without a LoRA


def check_sampling_config(config: ml_collections.ConfigDict) -> None:
    """Fail early, naming the key, on settings that cannot sample (before any weight is loaded).

    The dataset is not required.

    Raises:
        ConfigError: naming the key (a `ValueError`).
    """
    for key in ("eval_num_steps", "eval_batch_size"):
        value = config.sample[key]
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"config.sample.{key} must be a positive integer, got {value!r}; set it to 1 or more")
    check_model_and_resolution(config)


def check_model_inputs(config: ml_collections.ConfigDict, lora: str | None, scale: float) -> Path | None:
    """Check the sampling settings and the LoRA scale, and find the LoRA directory (None: no LoRA), before any weight loads.

    Raises:
        ConfigError, InputValueError, InputNotFoundError: naming the key, flag or path.
    """
    check_sampling_config(config)
    if not (math.isfinite(scale) and scale > 0):
        raise InputValueError(f"--lora_scale must be a positive number, got {scale}; 1 uses the LoRA as saved")
    return find_lora_dir(lora) if lora else None


def load_model(
    config: ml_collections.ConfigDict, device: torch.device, lora: str | None = None, scale: float = 1.0
) -> LoadedModel:
    """Load the pipeline of `config.pretrained` on `device`, and the LoRA checkpoint `lora` if given.

    The checkpoint's adapter metadata restores its trained rank and alpha. `scale` multiplies the
    LoRA's effect (adapter weight); 1.0 uses it as saved.
    """
    lora_dir = check_model_inputs(config, lora, scale)  # fail on a bad path before loading the model
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
    state_buckets: tuple[int, ...] = (),
    batch_seed: Callable[[Sequence[ImageJob]], int] | None = None,
    autocast: AutocastFactory | None = None,
    progress: bool = False,
) -> Iterator[tuple[list[ImageJob], torch.Tensor]]:
    """ODE-sample `jobs` in batches; yields `(jobs of the batch, images (B, 3, H, W) float32 in [0, 1])`.

    Args:
        batch_seed: None: every image draws its noise from its own generator seeded with `job.seed`
            (images independent of the batch size); otherwise one generator per batch, seeded with
            `batch_seed(jobs of the batch)`.
        autocast: the autocast context of each batch; None: autocast to the adapter's dtype
            (off in float32).
    """
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    device = adapter.device
    if autocast is None:
        autocast = lambda: torch.autocast(device.type, dtype=adapter.dtype, enabled=adapter.dtype != torch.float32)  # noqa: E731
    starts = range(0, len(jobs), batch_size)
    for start in tqdm(starts, desc="sampling", disable=not progress, leave=False):
        chunk = list(jobs[start : start + batch_size])
        if batch_seed is None:
            generator: torch.Generator | list[torch.Generator] = [torch.Generator(device).manual_seed(job.seed) for job in chunk]
        else:
            generator = torch.Generator(device).manual_seed(batch_seed(chunk))
        with torch.no_grad(), autocast():
            images = sample_ode(
                adapter,
                adapter.encode_prompts([job.text for job in chunk]),
                num_steps=num_steps,
                resolution=resolution,
                generator=generator,
                max_states_per_call=max_states_per_call,
                state_buckets=state_buckets,
            )
        yield chunk, images.float()


def config_batches(
    adapter: ModelAdapter, jobs: Sequence[ImageJob], sample: ml_collections.ConfigDict, **options: Any
) -> Iterator[tuple[list[ImageJob], torch.Tensor]]:
    """`generate_batches` with the evaluation settings of `config.sample` (eval steps and batch size)."""
    return generate_batches(
        adapter,
        jobs,
        num_steps=sample.eval_num_steps,
        resolution=sample.resolution,
        batch_size=sample.eval_batch_size,
        max_states_per_call=sample.max_states_per_call,
        state_buckets=tuple(sample.state_buckets),
        **options,
    )


# ----------------------------------------------------------------------------- reports


def sampling_settings(config: ml_collections.ConfigDict, loaded: LoadedModel, plan: SamplingPlan) -> dict[str, Any]:
    """What produced a tool's images: model, LoRA, prompts and sampling settings (for the JSON reports)."""
    return {
        "model": config.pretrained.model,
        "family": config.pretrained.family,
        "lora": loaded.lora,
        "lora_scale": loaded.lora_scale,
        "prompts": plan.origin,
        "num_prompts": plan.num_prompts,
        "images_per_prompt": plan.images_per_prompt,
        "num_steps": config.sample.eval_num_steps,
        "guidance_scale": config.sample.guidance_scale,
        "resolution": config.sample.resolution,
        "batch_size": config.sample.eval_batch_size,
        "seed": config.seed,
        "dtype": str(loaded.adapter.dtype).removeprefix("torch."),
        "num_processes": PartialState().num_processes,
    }


def sort_records(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per-image records ordered by prompt then sample index."""
    return sorted(records, key=lambda record: (record["prompt_index"], record["image_index"]))


def run_generation(
    config: ml_collections.ConfigDict,
    out_dir: str | os.PathLike[str],
    request: SamplingRequest = SamplingRequest(),
    overwrite: bool = False,
) -> list[dict[str, Any]]:
    """Sample the prompts and write `images/<prompt>_<sample>.png`, `index.jsonl` and `settings.json`.

    `index.jsonl` has one line per image (file, prompt index, sample index, seed, prompt, metadata),
    ordered by prompt then sample. Work is split over the processes of `PartialState()`. Returns the
    index rows. An `out_dir` holding an earlier run's outputs is refused, or with `overwrite` cleared
    of them first (`flow_grpo.run.outputs.claim_output_dir`).
    """
    state = PartialState()
    plan = plan_sampling(config, request)
    check_model_inputs(config, request.lora, request.lora_scale)
    out = Path(out_dir)
    claim_output_dir(out, overwrite, remove=state.is_main_process)
    image_dir = out / "images"
    if state.is_main_process:  # before the model loads: an --out that cannot be written fails in seconds
        image_dir.mkdir(parents=True, exist_ok=True)
    state.wait_for_everyone()
    loaded = load_model(config, state.device, request.lora, request.lora_scale)

    local = []
    own_jobs = plan.jobs[state.process_index :: state.num_processes]
    for chunk, images in config_batches(loaded.adapter, own_jobs, config.sample, progress=state.is_local_main_process):
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

    index = sort_records(gather_object(local))
    if state.is_main_process:
        write_jsonl(out / "index.jsonl", index)
        write_json(out / "settings.json", sampling_settings(config, loaded, plan))
        logger.info(f"wrote {len(index)} images to {image_dir}")
    state.wait_for_everyone()
    return index
