"""Command-line pieces shared by the scripts: logging set-up, reward weights, the sampling tools' flags."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

from absl import flags
from ml_collections import config_flags

__all__ = ["SamplingFlags", "define_sampling_flags", "parse_reward_weights", "setup_logging"]


def setup_logging() -> None:
    """Log INFO and above from every library to stderr with time and logger name."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO, force=True)


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


@dataclass(frozen=True)
class SamplingFlags:
    """The flags `scripts/evaluate.py` and `scripts/generate.py` share (see `define_sampling_flags`)."""

    config: flags.FlagHolder
    lora: flags.FlagHolder
    lora_scale: flags.FlagHolder
    out: flags.FlagHolder
    prompts: flags.FlagHolder
    split: flags.FlagHolder
    prompt: flags.FlagHolder
    num_images: flags.FlagHolder
    max_prompts: flags.FlagHolder

    def tool_arguments(self) -> dict[str, Any]:
        """Keyword arguments of `run_evaluation` / `run_generation` after the config and output directory."""
        return {
            "lora": self.lora.value or None,
            "lora_scale": self.lora_scale.value,
            "prompts": self.prompts.value,
            "texts": self.prompt.value,
            "split": self.split.value,
            "images_per_prompt": self.num_images.value,
            "max_prompts": self.max_prompts.value,
        }


def define_sampling_flags(out_help: str) -> SamplingFlags:
    """Define the preset, LoRA, output and prompt flags of a sampling tool; `out_help` describes `--out`."""
    return SamplingFlags(
        config=config_flags.DEFINE_config_file("config", "config/grpo.py:pickscore_sd3", "Preset: file:function."),
        lora=flags.DEFINE_string("lora", "", "LoRA checkpoint directory (.../checkpoints/epoch_XXXXX/lora); empty = base model."),
        lora_scale=flags.DEFINE_float("lora_scale", 1.0, "Adapter weight of the LoRA (multiplies its effect); 1 = as saved."),
        out=flags.DEFINE_string("out", None, out_help, required=True),
        prompts=flags.DEFINE_string("prompts", "", "Prompt file (.txt or .jsonl) or dataset directory; empty = config.dataset."),
        split=flags.DEFINE_string("split", "test", "Split read from a dataset directory."),
        prompt=flags.DEFINE_multi_string("prompt", [], "A prompt given directly (repeatable); overrides --prompts."),
        num_images=flags.DEFINE_integer("num_images", 1, "Images per prompt, each with its own seed.", lower_bound=1),
        max_prompts=flags.DEFINE_integer("max_prompts", 0, "Use only the first N prompts; 0 = all.", lower_bound=0),
    )
