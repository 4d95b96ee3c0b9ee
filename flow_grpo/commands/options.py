"""Command-line pieces shared by the scripts: logging set-up, reward weights, the sampling tools' flags."""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import logging
import math
import os
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, TextIO

import ml_collections
from absl import flags
from ml_collections import config_flags
from tqdm.contrib.logging import logging_redirect_tqdm

from flow_grpo.command_flags import InputValueError
from flow_grpo.run.paths import REPO_ROOT

if TYPE_CHECKING:
    from flow_grpo.sampling.generation import SamplingRequest

__all__ = [
    "SamplingFlags",
    "config_comments",
    "define_sampling_flags",
    "format_config",
    "log_lines_apart",
    "parse_reward_weights",
    "preset_summaries",
    "setup_logging",
    "training_help",
]

PRESET_FILE = REPO_ROOT / "config" / "grpo.py"
BASE_CONFIG_FILE = REPO_ROOT / "config" / "base.py"


def setup_logging() -> None:
    """Log INFO and above from every library to stderr with time and logger name."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO, force=True)


def parse_reward_weights(spec: str) -> dict[str, float]:
    """Parse `"pickscore:1,aesthetic:0.5"` into `{"pickscore": 1.0, "aesthetic": 0.5}`.

    A name without `:weight` gets weight 1; an empty or blank spec gives `{}` (use the config's
    rewards). Names are checked against the registry when the rewards are built.

    Raises:
        InputValueError: on an empty name, a weight that is not a finite number, or a repeated name.
    """
    weights: dict[str, float] = {}
    for item in spec.split(","):
        item = item.strip()
        if not item:
            continue
        name, _, weight_text = item.partition(":")
        name = name.strip()
        if not name:
            raise InputValueError(f"--rewards: entry {item!r} has no name; write name:weight, e.g. pickscore:1")
        try:
            weight = float(weight_text) if weight_text.strip() else 1.0
        except ValueError:
            raise InputValueError(
                f"--rewards: reward {name!r} has weight {weight_text!r}, which is not a number; write name:weight, e.g. {name}:1"
            ) from None
        if not math.isfinite(weight):
            raise InputValueError(f"--rewards: reward {name!r} has a non-finite weight {weight_text!r}; give a finite number")
        if name in weights:
            raise InputValueError(f"--rewards: reward {name!r} is given twice in {spec!r}; give each reward once")
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
    overwrite: flags.FlagHolder

    def request(self) -> SamplingRequest:
        """What `run_evaluation` / `run_generation` sample, from the flags."""
        from flow_grpo.sampling.generation import SamplingRequest  # torch and diffusers only for the sampling tools

        return SamplingRequest(
            lora=self.lora.value or None,
            lora_scale=self.lora_scale.value,
            prompts=self.prompts.value,
            texts=self.prompt.value,
            split=self.split.value,
            images_per_prompt=self.num_images.value,
            max_prompts=self.max_prompts.value,
        )


def define_sampling_flags(out_help: str) -> SamplingFlags:
    """Define the preset, LoRA, output and prompt flags of a sampling tool; `out_help` describes `--out`."""
    return SamplingFlags(
        config=config_flags.DEFINE_config_file("config", f"{PRESET_FILE}:pickscore_sd3", "Preset: file:function."),
        lora=flags.DEFINE_string("lora", "", "LoRA checkpoint directory (.../checkpoints/epoch_XXXXX/lora); empty = base model."),
        lora_scale=flags.DEFINE_float("lora_scale", 1.0, "Adapter weight of the LoRA (multiplies its effect); 1 = as saved."),
        out=flags.DEFINE_string("out", None, out_help, required=True),
        prompts=flags.DEFINE_string("prompts", "", "Prompt file (.txt or .jsonl) or dataset directory; empty = config.dataset."),
        split=flags.DEFINE_string("split", "test", "Split read from a dataset directory."),
        prompt=flags.DEFINE_multi_string("prompt", [], "A prompt given directly (repeatable); overrides --prompts."),
        num_images=flags.DEFINE_integer("num_images", 1, "Images per prompt, each with its own seed.", lower_bound=1),
        max_prompts=flags.DEFINE_integer("max_prompts", 0, "Use only the first N prompts; 0 = all.", lower_bound=0),
        overwrite=flags.DEFINE_bool("overwrite", False, "Replace the outputs of an earlier run in --out (refused without it)."),
    )


# ----------------------------------------------------------------------------- presets and config help


def _load_preset_module(path: str | os.PathLike[str]) -> ModuleType:
    spec = importlib.util.spec_from_file_location("flow_grpo_config_presets", str(path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def preset_summaries(path: str | os.PathLike[str] = PRESET_FILE) -> list[tuple[str, str]]:
    """`(name, one line)` per preset of a preset file: the first line of the preset function's docstring,
    else its family, algorithm, dataset and reward read from the preset's config.
    """
    module = _load_preset_module(path)
    summaries = []
    for name, function in sorted(vars(module).items()):
        if name.startswith("_") or name == "get_config" or not inspect.isfunction(function):
            continue
        if function.__module__ != module.__name__:
            continue
        doc = inspect.getdoc(function)
        if doc:
            line = doc.splitlines()[0]
        else:
            config = function()
            rewards = ", ".join(f"{key}:{value:g}" for key, value in config.reward_fn.items())
            algorithm = {"tp_grpo": "TP-GRPO", "flow_grpo": "Flow-GRPO"}.get(config.algorithm, config.algorithm)
            line = f"{algorithm} on {config.pretrained.family.upper()}, prompts {config.dataset}, reward {rewards}."
        summaries.append((name, line))
    return summaries


def config_comments(path: str | os.PathLike[str] = BASE_CONFIG_FILE) -> dict[str, str]:
    """Key -> comment of every `x.y = value  # comment` line of `config/base.py`.

    Sub-dict aliases (`config.sample = sample = ...`, `remote = reward_options[name] = ...`) are
    followed; a key set in a loop over names is returned with `*` for the name (`reward_options.*.url`).
    """
    aliases = {"config": ""}
    comments: dict[str, str] = {}
    key_line = re.compile(r"^\s*(\w+)((?:\.\w+)+)\s*=\s*.*?#\s*(.+)$")
    for line in Path(path).read_text().splitlines():
        match = re.match(r"^\s*config\.(\w+)\s*=\s*(\w+)\s*=\s*ml_collections\.ConfigDict\(", line)
        if match:
            aliases[match.group(2)] = match.group(1)
            continue
        match = re.match(r"^\s*(\w+)\s*=\s*(\w+)\[\w+\]\s*=\s*ml_collections\.ConfigDict\(", line)
        if match and match.group(2) in aliases:
            aliases[match.group(1)] = f"{aliases[match.group(2)]}.*"
            continue
        match = key_line.match(line)
        if match and match.group(1) in aliases:
            prefix = aliases[match.group(1)]
            key = f"{prefix}{match.group(2)}".lstrip(".")
            comments[key] = match.group(3).strip()
    return comments


def _flatten(value: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(value, (ml_collections.ConfigDict, dict)):
        items = value.items()
        return [pair for key, child in items for pair in _flatten(child, f"{prefix}{key}.")]
    return [(prefix.rstrip("."), value)]


def _comment_for(key: str, comments: dict[str, str]) -> str:
    """The comment of `key`, of its pattern with one segment replaced by `*` (keys set in a loop), or of its parent."""
    if key in comments:
        return comments[key]
    parts = key.split(".")
    for index in range(len(parts) - 1):
        pattern = ".".join([*parts[:index], "*", *parts[index + 1 :]])
        if pattern in comments:
            return comments[pattern]
    parent = key.rpartition(".")[0]
    return _comment_for(parent, comments) if parent else ""


def format_config(config: ml_collections.ConfigDict, comments: dict[str, str] | None = None) -> str:
    """Every key of `config` as `key = value  # comment`, one per line (comments from `config/base.py`)."""
    comments = config_comments() if comments is None else comments
    lines = []
    for key, value in _flatten(config):
        comment = _comment_for(key, comments)
        lines.append(f"{key} = {value!r}" + (f"  # {comment}" if comment else ""))
    return "\n".join(lines)


def training_help(program: str, default_preset: str) -> str:
    """The `--help` text of the training entry points: usage, presets (one line each), how to see a config."""
    width = max(len(name) for name, _ in preset_summaries())
    presets = "\n".join(f"  {name.ljust(width)}  {line}" for name, line in preset_summaries())
    return f"""usage: {program} [--config=config/grpo.py:PRESET] [--config.KEY=VALUE ...] [--print_config]

Train LoRA adapters of a flow-matching text-to-image model with Flow-GRPO or TP-GRPO.

Flags:
  --config=FILE:PRESET   preset to train (default {default_preset}); paths resolve from any directory
  --config.KEY=VALUE     override one key, e.g. --config.num_epochs=4 --config.sample.noise_level=0.5
  --print_config         print the resolved config (preset plus overrides), every key with its comment, and exit
  --helpfull             every absl flag

Presets (config/grpo.py):
{presets}

First steps:
  make tiny-model                                          # tiny offline models for the tiny_* presets
  {program} --config=config/grpo.py:tiny_tp_grpo           # CPU demo, a few minutes
  python scripts/prepare_data.py --source pickapic_sfw     # dataset/pickscore_sfw for the pickscore_* presets
  {program} --config=config/grpo.py:pickscore_sd3 --print_config
The published presets download their model from the Hugging Face hub: SD3.5 and FLUX.1-dev are gated
(accept the license, then `huggingface-cli login`), or set --config.pretrained.model=/local/diffusers/dir.
"""


# ----------------------------------------------------------------------------- log lines and progress bars


class _LineTrackingStream:
    """A text stream that remembers whether the last character written ended a line."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.at_line_start = True

    def write(self, text: str) -> int:
        if text:
            self.at_line_start = text.endswith("\n")
        return self.stream.write(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


class _OwnLineHandler(logging.StreamHandler):
    """Starts a new line before a record when a progress bar left the current line unfinished."""

    def emit(self, record: logging.LogRecord) -> None:
        if not self.stream.at_line_start:
            self.stream.write("\n")
        super().emit(record)


@contextlib.contextmanager
def log_lines_apart() -> Iterator[None]:
    """Keep every log line on its own line, apart from tqdm progress bars, so `grep` on a log works.

    On a terminal, records are written through tqdm (`logging_redirect_tqdm`), which clears the bars
    first. When stderr is a file or pipe, bars are written as they are, and a record that follows an
    unfinished bar line starts a new line.
    """
    if sys.stderr.isatty():
        with logging_redirect_tqdm():
            yield
        return
    original, tracked = sys.stderr, _LineTrackingStream(sys.stderr)
    root = logging.getLogger()
    replaced = [h for h in root.handlers if type(h) is logging.StreamHandler and h.stream in (original, sys.__stderr__)]
    for handler in replaced:
        own_line = _OwnLineHandler(tracked)
        own_line.setFormatter(handler.formatter)
        own_line.setLevel(handler.level)
        root.removeHandler(handler)
        root.addHandler(own_line)
    sys.stderr = tracked
    try:
        yield
    finally:
        sys.stderr = original
        for handler in [h for h in root.handlers if isinstance(h, _OwnLineHandler)]:
            root.removeHandler(handler)
        for handler in replaced:
            root.addHandler(handler)
