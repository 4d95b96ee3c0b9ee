"""Crash-safe checkpoints: written to a temporary directory, renamed when complete, newest K kept.

Layout of one checkpoint `<run>/checkpoints/epoch_XXXXX/`:
    lora/                     the LoRA (EMA weights when enabled) in the diffusers format
    state.pt                  raw LoRA weights, optimizer, EMA, grad scaler, counters
    rng_<rank>.pt             every RNG state of each process
A directory whose name ends in `.tmp` is an unfinished write and is never loaded.

Checkpoint files are data, never code: they hold only tensors and plain Python values and are
read with `torch.load(weights_only=True)`, so a planted file cannot run code when a run resumes.
"""

from __future__ import annotations

import errno
import os
import pickle
import random
import re
import shutil
from typing import Any

import numpy as np
import torch
from accelerate.logging import get_logger

from flow_grpo.command_flags import UserInputError, one_line
from flow_grpo.run.files import open_to_write

logger = get_logger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^epoch_(\d{5,})$")
RNG_PATTERN = re.compile(r"^rng_\d+\.pt$")
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


class CheckpointError(UserInputError, RuntimeError):
    """A checkpoint file that cannot be used: missing, empty, truncated, corrupt or not plain data."""


CPU_GENERATORS = ("python", "numpy", "torch")
"""The generators of an `rng_<rank>.pt` every process has; `cuda` is there only on CUDA machines."""


def rng_state() -> dict[str, Any]:
    """Every RNG state of this process (Python, NumPy, torch CPU and CUDA), as tensors and plain values."""
    state = _cpu_rng_state()
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _cpu_rng_state() -> dict[str, Any]:
    version, python_state, gauss = random.getstate()
    algorithm, keys, position, has_gauss, cached = np.random.get_state()
    return {
        "python": {"version": version, "state": list(python_state), "gauss": gauss},
        "numpy": {
            "algorithm": algorithm,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "position": int(position),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the states saved by `rng_state`."""
    python = state["python"]
    random.setstate((python["version"], tuple(python["state"]), python["gauss"]))
    numpy_state = state["numpy"]
    np.random.set_state(
        (
            numpy_state["algorithm"],
            numpy_state["keys"].numpy().astype(np.uint32),
            numpy_state["position"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_file(value: Any, path: str) -> None:
    """Write `value` (tensors and plain values) to `path` via a `.part` file renamed when complete.

    Raises:
        OSError: "no space left on device" naming `path` when the disk is full; the file that
            was there before (if any) is untouched.
    """
    partial = path + ".part"
    try:
        # Through a Python file: a full disk raises OSError(ENOSPC) here, where torch's own writer
        # of a path reports only "unexpected pos".
        with open_to_write(partial, "wb") as f:
            torch.save(value, f)
        os.replace(partial, path)
    except OSError as error:
        if os.path.lexists(partial) and not os.path.islink(partial):
            os.remove(partial)
        if error.errno == errno.ENOSPC:
            raise no_space_error(path, error) from error
        raise


def no_space_error(path: str, error: OSError) -> OSError:
    """The error of a full disk while writing `path`: names the path and what to do."""
    return OSError(
        errno.ENOSPC,
        f"no space left on device while writing {path}; free space or point config.logdir elsewhere "
        f"(the previous checkpoint stays the newest) [{error.strerror or error}]",
    )


def load_file(path: str) -> Any:
    """Read a checkpoint file as data only (`weights_only=True`), with errors that name the file.

    Raises:
        CheckpointError: the file is missing, empty, truncated or corrupt, or holds objects
            other than tensors and plain values (unpickling them could run code).
    """
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint file {path} does not exist")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"checkpoint file {path} is empty (0 bytes): an interrupted or failed write")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        # torch names the refused callable as "Unsupported global: GLOBAL x" or "unsupported GLOBAL x whose ...".
        refused = re.search(r"(?i)unsupported (?:global: )?GLOBAL ([\w.]+)", str(error))
        what = f" (it names {refused.group(1)})" if refused else ""
        raise CheckpointError(
            f"checkpoint file {path} holds objects other than tensors and plain values{what}; refusing to load it, "
            "since unpickling them could run code"
        ) from None
    except (RuntimeError, EOFError, ValueError, OSError) as error:
        raise CheckpointError(f"checkpoint file {path} is truncated or corrupt (torch: {one_line(str(error))})") from None


def load_checkpoint_state(path: str) -> dict[str, Any]:
    """The training state (`state.pt`) of the checkpoint directory `path`, checked for its structure.

    The RNG files (`rng_<rank>.pt`) are read too, so a checkpoint whose RNG states do not load is
    found here, before any model loads, like one whose `state.pt` does not.

    Raises:
        CheckpointError: a file does not load, or does not hold what `save_state` writes.
    """
    file = os.path.join(path, STATE_FILE)
    state = load_file(file)
    problem = _state_problem(state)
    if problem is not None:
        raise CheckpointError(f"checkpoint file {file} is not a training state of this trainer: {problem}")
    for name in sorted(os.listdir(path)):
        if RNG_PATTERN.match(name):
            rng_file = os.path.join(path, name)
            problem = _rng_problem(load_file(rng_file))
            if problem is not None:
                raise CheckpointError(f"checkpoint file {rng_file} is not an RNG state of this trainer: {problem}")
    return state


def _rng_problem(state: Any) -> str | None:
    """What keeps a loaded `rng_<rank>.pt` from restoring, or None.

    The CPU generators are tried: set from `state`, then put back as they were. CUDA states are
    only checked for their type, since setting them would start CUDA on every device.
    """
    if not isinstance(state, dict) or not all(key in state for key in CPU_GENERATORS):
        return f"it is not a dict with the states {list(CPU_GENERATORS)}"
    cuda = state.get("cuda", [])
    if not isinstance(cuda, (list, tuple)) or not all(isinstance(value, torch.Tensor) for value in cuda):
        return "cuda is not a list of generator states"
    current = _cpu_rng_state()
    try:
        set_rng_state({key: state[key] for key in CPU_GENERATORS})
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as error:
        return f"it does not restore ({type(error).__name__}: {error})"
    finally:
        set_rng_state(current)
    return None


def _state_problem(state: Any) -> str | None:
    """What is wrong with the structure of a loaded `state.pt`, or None."""
    if not isinstance(state, dict):
        return f"it holds {type(state).__name__}, not a dict"
    missing = [key for key in ("epoch", "optimizer_updates", "lora", "optimizer") if key not in state]
    if missing:
        return f"keys {missing} are missing"
    for key in ("epoch", "optimizer_updates"):
        if isinstance(state[key], bool) or not isinstance(state[key], int) or state[key] < 0:
            return f"{key} is {state[key]!r}, not a non-negative integer"
    lora = state["lora"]
    if not isinstance(lora, dict) or not all(isinstance(value, torch.Tensor) for value in lora.values()):
        return "lora is not a mapping of parameter names to tensors"
    if not isinstance(state["optimizer"], dict):
        return "optimizer is not an optimizer state dict"
    return None


def newest_loadable(run_dir: str) -> tuple[str, dict[str, Any]]:
    """The newest checkpoint of `run_dir` whose state loads, and that state.

    A newer checkpoint that fails to load is skipped with a warning naming the file, so a run
    resumes from the previous complete checkpoint.

    Raises:
        FileNotFoundError: the run has no checkpoint that loads.
    """
    problems = []
    for path in reversed(list_checkpoints(run_dir)):
        try:
            state = load_checkpoint_state(path)
        except CheckpointError as error:
            logger.warning(f"{error}; falling back to the previous checkpoint")
            problems.append(str(error))
            continue
        return path, state
    detail = f" ({'; '.join(problems)})" if problems else ""
    raise FileNotFoundError(f"run directory {run_dir} has no loadable checkpoint under checkpoints/{detail}")


def temporary_dir(target: str) -> str:
    """The `.tmp` sibling a checkpoint is written into before it is renamed to `target`."""
    return target + ".tmp"


def publish(target: str, keep: int) -> None:
    """Rename the finished temporary directory to `target` (atomic on one file system) and prune.

    Only the newest `keep` complete checkpoints of the run stay (0 keeps all; see `prune`).
    """
    replaced = None
    if os.path.islink(target):
        os.unlink(target)
    elif os.path.exists(target):
        replaced = _set_aside(target)
    os.replace(temporary_dir(target), target)
    if replaced is not None:
        shutil.rmtree(replaced)
    if keep > 0:
        prune(os.path.dirname(os.path.dirname(target)), keep)


def _set_aside(path: str) -> str:
    """Rename the directory `path` to a name no checkpoint pattern matches, in one step; return the new name.

    Deleting a checkpoint in place and being killed half-way would leave a half-deleted directory
    under a checkpoint's name; a directory set aside first is deleted under its new name instead.
    """
    aside = f"{path}.removing-{os.getpid()}"
    if os.path.lexists(aside):  # left by a killed process whose pid this one now has
        shutil.rmtree(aside)
    os.replace(path, aside)
    return aside


def prune(run_dir: str, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints of `run_dir`, never following a symbolic link.

    A checkpoint that is a link is unlinked (its target stays); under a `checkpoints/` that is
    itself a link nothing is deleted, since the checkpoints live outside the run directory.
    """
    root = os.path.join(run_dir, "checkpoints")
    if os.path.islink(root):
        logger.warning(f"{root} is a symbolic link: old checkpoints are not pruned (they live outside the run)")
        return
    for old in list_checkpoints(run_dir)[:-keep]:
        if os.path.islink(old):
            logger.warning(f"pruning {old}: removing the symbolic link only; its target is left as it is")
            os.unlink(old)
        else:
            shutil.rmtree(_set_aside(old))
