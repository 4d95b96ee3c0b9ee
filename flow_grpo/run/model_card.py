"""The model card (`README.md`) of an exported LoRA directory: what produced it and how to reproduce its images.

The card states the base model, algorithm, reward, epoch and eval score, and every setting a plain
diffusers call needs to reproduce the trainer's evaluation images: pipeline class, dtype, steps,
guidance, resolution, the text encoder's `max_sequence_length` and how the initial noise is drawn. The settings are
in one fenced JSON block (`read_card_settings` parses it) and in a runnable snippet.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections

from flow_grpo.models import adapter_class
from flow_grpo.precision import mixed_precision_dtype
from flow_grpo.run.outputs import strict_json_value
from flow_grpo.seeding import derived_seed

__all__ = ["card_settings", "read_card_settings", "write_model_card", "write_trainer_card"]

CARD_FILE = "README.md"
_SETTINGS = re.compile(r"```json\n(.*?)\n```", re.DOTALL)


def card_settings(
    config: ml_collections.ConfigDict,
    pipeline_class: str,
    epoch: int,
    eval_means: Mapping[str, float] | None,
    first_eval_prompts: Sequence[str],
    device: str,
) -> dict[str, Any]:
    """The card's settings: model, training summary, the diffusers call and the noise of the first eval batch.

    The trainer's evaluation draws each batch's initial noise with one `torch.Generator(device)`
    seeded with `derived_seed(config.seed, index of the batch's first prompt)`, exactly as the
    pipeline draws `latents` from a `generator`; so calling the pipeline on the first eval batch's
    prompts with that seed reproduces the trainer's first evaluation images.
    """
    sample = config.sample
    dtype = str(mixed_precision_dtype(config.mixed_precision)).removeprefix("torch.")
    return {
        "base_model": config.pretrained.model,
        "revision": config.pretrained.revision or None,
        "pipeline": pipeline_class,
        "torch_dtype": dtype,
        "algorithm": config.algorithm,
        "guidance_scale": sample.guidance_scale,
        "reward": dict(config.reward_fn),
        "eval_reward": dict(config.eval_reward_fn),
        "epoch": epoch,
        "eval": dict(eval_means) if eval_means is not None else None,
        "call": {
            "num_inference_steps": sample.eval_num_steps,
            # The pipeline's own guidance arguments (e.g. Qwen-Image: `true_cfg_scale` and a negative prompt).
            **adapter_class(config.pretrained.family).pipeline_guidance(sample.guidance_scale),
            "height": sample.resolution,
            "width": sample.resolution,
            "max_sequence_length": config.pretrained.max_sequence_length,
        },
        "noise": {
            "generator_device": device,
            "first_eval_batch_seed": derived_seed(config.seed, 0),
            "first_eval_batch_prompts": list(first_eval_prompts),
        },
        "lora_rank": config.train.lora_rank,
        "lora_alpha": config.train.lora_alpha,
    }


def _card_text(settings: dict[str, Any]) -> str:
    call = settings["call"]
    noise = settings["noise"]
    score = (
        ", ".join(f"{name} {_score_text(value)}" for name, value in settings["eval"].items())
        if settings["eval"]
        else "not evaluated at this epoch"
    )
    rewards = ", ".join(f"{name} (weight {weight:g})" for name, weight in settings["reward"].items())
    algorithm = {"tp_grpo": "TP-GRPO", "flow_grpo": "Flow-GRPO"}.get(settings["algorithm"], settings["algorithm"])
    # Every value placed into the Python snippet goes through repr (a quote in a path stays a string).
    arguments = ", ".join(f"{key}={value!r}" for key, value in call.items())
    device = str(noise["generator_device"])
    if not settings["pipeline"].isidentifier() or not settings["torch_dtype"].isidentifier():
        raise ValueError(f"pipeline {settings['pipeline']!r} and dtype {settings['torch_dtype']!r} must be Python names")
    return f"""# LoRA: {algorithm} on {settings['base_model']}

- Base model: `{settings['base_model']}` (`{settings['pipeline']}`, {settings['torch_dtype']})
- Algorithm: {algorithm}, LoRA rank {settings['lora_rank']}, alpha {settings['lora_alpha']}
- Training reward: {rewards}
- Epoch: {settings['epoch']} (0-based)
- Eval score: {score}
- Sampling: {call['num_inference_steps']} steps, guidance {settings['guidance_scale']}, {call['width']}x{call['height']} px,
  text-encoder max_sequence_length {call['max_sequence_length']}
- Initial noise: the trainer's first evaluation batch (the prompts below) draws its noise as the
  pipeline does from `torch.Generator({device!r}).manual_seed({int(noise['first_eval_batch_seed'])})`
  for the whole batch; the call below reproduces those evaluation images.

```python
import torch
from diffusers import {settings['pipeline']}

pipe = {settings['pipeline']}.from_pretrained({settings['base_model']!r}, torch_dtype=torch.{settings['torch_dtype']})
pipe.load_lora_weights("path/to/this/directory")
pipe.to({device!r})
prompts = {noise['first_eval_batch_prompts']!r}
generator = torch.Generator({device!r}).manual_seed({int(noise['first_eval_batch_seed'])})
images = pipe(prompt=prompts, {arguments}, generator=generator).images
```

Settings (machine-readable):

```json
{json.dumps(strict_json_value(settings), indent=2, allow_nan=False)}
```
"""


def _score_text(value: float | None) -> str:
    return "not finite" if value is None or not math.isfinite(value) else f"{value:.4f}"


def write_model_card(lora_dir: str | os.PathLike[str], settings: dict[str, Any]) -> str:
    """Write `README.md` into the exported LoRA directory `lora_dir`; returns its path."""
    path = os.path.join(lora_dir, CARD_FILE)
    with open(path, "w", encoding="utf-8") as f:
        f.write(_card_text(settings))
    return path


def read_card_settings(lora_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The settings JSON block of the model card in `lora_dir`.

    Raises:
        ValueError: when the card has no JSON settings block.
    """
    text = open(os.path.join(lora_dir, CARD_FILE), encoding="utf-8").read()
    blocks = _SETTINGS.findall(text)
    if not blocks:
        raise ValueError(f"{lora_dir}/{CARD_FILE} has no ```json settings block")
    return json.loads(blocks[-1])


def write_trainer_card(lora_dir: str | os.PathLike[str], trainer: Any, epoch: int) -> str:
    """Write the card of the LoRA a `Trainer` exports after `epoch` (its newest eval, if at `epoch`)."""
    config, accelerator = trainer.config, trainer.accelerator
    evaluated = trainer.last_eval[1] if trainer.last_eval is not None and trainer.last_eval[0] == epoch else None
    # Evaluation deals prompts round-robin to the processes; the main process's first batch:
    test_prompts = trainer.test_dataset.prompts if trainer.test_dataset is not None else []
    prompts = [prompt.text for prompt in test_prompts[:: accelerator.num_processes]]
    settings = card_settings(
        config,
        trainer.adapter.pipeline_class.__name__,
        epoch,
        evaluated,
        prompts[: config.sample.eval_batch_size],
        accelerator.device.type,
    )
    return write_model_card(lora_dir, settings)
