"""Crash-safe checkpoints: written to a temporary directory, renamed when complete, newest K kept.

Layout of one checkpoint `<run>/checkpoints/epoch_XXXXX/`:
    lora/                     the LoRA (EMA weights when enabled) in the diffusers format
    state.pt                  raw LoRA weights, optimizer, EMA, grad scaler, counters
    rng_<rank>.pt             every RNG state of each process
A directory whose name ends in `.tmp` is an unfinished write and is never loaded.
"""

from __future__ import annotations

import os
import random
import re
import shutil

import numpy as np
import torch

CHECKPOINT_PATTERN = re.compile(r"^epoch_(\d{5,})$")
STATE_FILE = "state.pt"


def checkpoint_dir(run_dir: str, epoch: int) -> str:
    """Directory of the checkpoint written after `epoch`."""
    return os.path.join(run_dir, "checkpoints", f"epoch_{epoch:05d}")


def list_checkpoints(run_dir: str) -> list[str]:
    """Complete checkpoints of a run, oldest first."""
    root = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        match = CHECKPOINT_PATTERN.match(name)
        if match and os.path.isfile(os.path.join(root, name, STATE_FILE)):
            found.append((int(match.group(1)), os.path.join(root, name)))
    return [path for _, path in sorted(found)]


def resolve_checkpoint(path: str) -> str:
    """A checkpoint directory from `path`: the checkpoint itself, or the newest one of a run directory."""
    if os.path.isfile(os.path.join(path, STATE_FILE)):
        return path
    checkpoints = list_checkpoints(path)
    if not checkpoints:
        raise FileNotFoundError(
            f"config.resume_from={path!r} is neither a checkpoint (a directory with {STATE_FILE}) nor a run "
            "directory with complete checkpoints under checkpoints/. Point it at logs/<run> or "
            "logs/<run>/checkpoints/epoch_XXXXX."
        )
    return checkpoints[-1]


def rng_state() -> dict:
    """Every RNG state of this process (Python, NumPy, torch CPU and CUDA)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore the states saved by `rng_state`."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def temporary_dir(target: str) -> str:
    """The `.tmp` sibling a checkpoint is written into before it is renamed to `target`."""
    return target + ".tmp"


def publish(target: str, keep: int) -> None:
    """Rename the finished temporary directory to `target` (atomic on one file system) and prune.

    Only the newest `keep` complete checkpoints of the run stay (0 keeps all).
    """
    if os.path.exists(target):
        shutil.rmtree(target)
    os.replace(temporary_dir(target), target)
    if keep > 0:
        run_dir = os.path.dirname(os.path.dirname(target))
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old)
