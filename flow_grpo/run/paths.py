"""Repository-relative paths: presets name `dataset/...`, `.cache/tiny-sd3` and `config/grpo.py`
relative to the repository, so a run started from any directory finds them.

A relative path is looked up in the working directory first (a user's own `dataset/x` wins), then
in the repository root. A missing path raises `ConfigError` naming the config key and every
directory that was tried.
"""

from __future__ import annotations

import os
from pathlib import Path

import ml_collections

from flow_grpo.run.config_checks import ConfigError

__all__ = ["REPO_ROOT", "check_model_source", "resolve_config_argument", "resolve_config_paths", "resolve_path"]

REPO_ROOT = Path(__file__).resolve().parents[2]
"""The repository checkout holding `config/`, `dataset/` and `.cache/`."""

_HINTS = {
    "dataset": (
        "Prompt sets are built by scripts/prepare_data.py (e.g. `python scripts/prepare_data.py --source pickapic_sfw` "
        "writes dataset/pickscore_sfw); dataset/demo ships with the repository."
    ),
    "pretrained.model": (
        "Run `make tiny-model` for the tiny offline models of the tiny_* presets, or set "
        "--config.pretrained.model to a hub id or a local diffusers directory."
    ),
}


def _candidates(value: str) -> list[Path]:
    path = Path(value).expanduser()
    if path.is_absolute():
        return [path]
    return [Path.cwd() / path, REPO_ROOT / path]


def resolve_path(value: str, key: str) -> str:
    """The absolute path of `value` (config key `key`): as given, else under the cwd, else under the repository.

    Raises:
        ConfigError: when no candidate exists; the message names `key` and the directories tried.
    """
    candidates = _candidates(value)
    for candidate in candidates:
        if candidate.exists():
            return str(candidate.resolve())
    tried = " and ".join(str(candidate) for candidate in candidates)
    where = f"relative to the working directory {Path.cwd()} and the repository {REPO_ROOT}" if len(candidates) > 1 else "as given"
    hint = _HINTS.get(key, "").rstrip(".")
    fix = f"; {hint[:1].lower()}{hint[1:]}" if hint else ""
    raise ConfigError(f"config.{key}: {value!r} does not exist {where} (tried {tried}){fix}")


def _is_hub_id(value: str) -> bool:
    """`org/name` or `name`: how a Hugging Face hub repository is written (never `./x`, `a/b/c` or absolute)."""
    parts = value.split("/")
    return not value.startswith((".", "~", os.sep)) and len(parts) <= 2 and all(parts)


def resolve_config_paths(config: ml_collections.ConfigDict, *, dataset: bool = True) -> ml_collections.ConfigDict:
    """Make `config.dataset` and a local `config.pretrained.model` absolute (in place); returns `config`.

    `pretrained.model` stays as written when it is not a local directory and reads as a hub id.
    `dataset=False` leaves `config.dataset` as written and unchecked (a tool given its prompts directly).

    Raises:
        ConfigError: for a dataset directory or local model directory that is not found.
    """
    if dataset:
        config.dataset = resolve_path(config.dataset, "dataset")
    model = config.pretrained.model
    try:
        config.pretrained.model = resolve_path(model, "pretrained.model")
    except ConfigError:
        if not _is_hub_id(model):
            raise
    return config


def resolve_config_argument(argv: list[str]) -> list[str]:
    """`argv` with the file of `--config=FILE:preset` made absolute when it is found only under the repository."""
    resolved = []
    for index, argument in enumerate(argv):
        prefix = "--config=" if argument.startswith("--config=") else ""
        if prefix or (index > 0 and argv[index - 1] == "--config"):
            file, colon, preset = argument.removeprefix(prefix).partition(":")
            if file and not Path(file).is_absolute() and not Path(file).exists() and (REPO_ROOT / file).is_file():
                argument = f"{prefix}{REPO_ROOT / file}{colon}{preset}"
        resolved.append(argument)
    return resolved


def check_model_source(model: str) -> str | None:
    """Check that a hub model id can be loaded; returns a warning for a model that must be downloaded, else None.

    A local directory (already resolved by `resolve_config_paths`) passes. A hub id that is not in the
    local Hugging Face cache needs network access (and a login for gated models).

    Raises:
        ConfigError: when the hub id is not cached and `HF_HUB_OFFLINE` is set.
    """
    if os.path.isdir(model):
        return None
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(model, "model_index.json"), str):
        return None
    advice = (
        f"config.pretrained.model: {model!r} is not in the local Hugging Face cache. Downloading it needs network "
        "access and, for gated models (SD3.5, FLUX.1-dev), accepting the license on the hub and `huggingface-cli login`; "
        "or set --config.pretrained.model=/path/to/a/local/diffusers/pipeline."
    )
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        raise ConfigError(advice + " HF_HUB_OFFLINE is set, so it cannot be downloaded.")
    return advice
