"""Helpers shared by the reward factories: option checking, dtypes, weight files, chunking."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from flow_grpo.command_flags import InputNotFoundError, InputValueError
from flow_grpo.precision import DTYPE_NAMES

__all__ = ["chunk_slices", "parse_options", "resolve_dtype", "resolve_weights_file"]

def parse_options(
    reward: str, options: Mapping[str, Any], defaults: Mapping[str, Any], prefix: str = "reward_options"
) -> dict[str, Any]:
    """Merge ``options`` over ``defaults`` after checking names and types.

    Args:
        reward: reward name, used in error messages (``reward_options.<reward>.<key>``).
        options: the user's settings for this reward (may be partial or empty).
        defaults: every accepted key with its default; a value's type is the accepted type
            (an ``int`` is accepted where the default is a ``float``).
        prefix: where the options come from, for messages (``reward_options`` in the training
            config, the ``--options`` of the reward server for server scorers).

    Raises:
        InputValueError: on an unknown key, a value of the wrong type or a ``batch_size`` below 1 (a `ValueError`).
    """
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise InputValueError(
            f"Unknown option(s) {unknown} for reward {reward!r}; it accepts {sorted(defaults)}. Fix {prefix}.{reward}."
        )
    merged = dict(defaults)
    for key, value in options.items():
        default = defaults[key]
        expected: tuple[type, ...] = (float, int) if isinstance(default, float) else (type(default),)
        if (isinstance(value, bool) and not isinstance(default, bool)) or not isinstance(value, expected):
            raise InputValueError(f"{prefix}.{reward}.{key} is {value!r}; give a value of type {type(default).__name__}.")
        merged[key] = float(value) if isinstance(default, float) else value
    if merged.get("batch_size", 1) < 1:
        raise InputValueError(f"{prefix}.{reward}.batch_size is {merged['batch_size']}; give 1 or more.")
    return merged


def resolve_dtype(name: str, device: torch.device, reward: str) -> torch.dtype:
    """Map a dtype option to a torch dtype.

    ``"auto"`` is float16 on CUDA and float32 elsewhere (half precision is slow or unsupported
    for some CPU kernels).
    """
    if name == "auto":
        return torch.float16 if torch.device(device).type == "cuda" else torch.float32
    if name not in DTYPE_NAMES:
        raise InputValueError(f"reward_options.{reward}.dtype is {name!r}; set it to 'auto' or one of {sorted(DTYPE_NAMES)}.")
    return DTYPE_NAMES[name]


def resolve_weights_file(spec: str, reward: str, key: str) -> str:
    """Return a local path for a weights file given as a local path or ``"<hub repo id>:<file>"``.

    Hub files are fetched with ``huggingface_hub.hf_hub_download`` (from the local cache when
    ``HF_HUB_OFFLINE=1``).

    Raises:
        InputNotFoundError: when the path does not exist and ``spec`` is not a hub reference, or
            the hub download fails; the message says which option to change (a ``FileNotFoundError``).
    """
    setting = f"reward_options.{reward}.{key}"
    if not spec:
        raise InputNotFoundError(f"{setting} is empty; set it to a local file or '<hub repo id>:<file name>'.")
    expanded = os.path.expanduser(spec)
    if os.path.isfile(expanded):
        return expanded
    repo_id, sep, filename = spec.partition(":")
    if not sep or not filename or repo_id.count("/") != 1 or os.path.isabs(spec) or spec.startswith("."):
        raise InputNotFoundError(
            f"{setting} = {spec!r} is neither an existing file nor a hub reference '<org>/<repo>:<file name>'; "
            "point it at the downloaded weights file."
        )
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(repo_id=repo_id, filename=filename)
    except Exception as error:  # the hub raises many error types (offline, 404, network)
        raise InputNotFoundError(
            f"Could not fetch {filename!r} from the hub repository {repo_id!r} ({type(error).__name__}: {error}); "
            f"download it once with network access, or set {setting} to a local file."
        ) from error


def chunk_slices(num: int, chunk_size: int) -> Iterator[slice]:
    """Slices ``[0, c), [c, 2c), ...`` covering ``range(num)``."""
    for start in range(0, num, chunk_size):
        yield slice(start, min(start + chunk_size, num))
