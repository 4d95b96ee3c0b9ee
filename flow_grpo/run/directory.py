"""Run directories: which directory a run writes to, what it resumes from, and the run's records.

Rules (README "Checkpoints and resuming"):
- A fresh run writes to `<logdir>/<run_name>`; a directory that already holds a run is refused.
- `resume_from=<run dir>` or `"latest"` (the newest run of `logdir`, or `logdir/<run_name>` when a
  run name is given) continues that run in its own directory from its newest loadable checkpoint.
- `resume_from=<checkpoint>` that is the newest of its run continues the run; an older checkpoint
  (or a different `run_name`) starts a branch: a new run directory whose `config.json` records the
  parent checkpoint; the parent run is not modified. `resume_overwrite=True` continues in the parent
  directory instead, setting the later checkpoints aside as `epoch_XXXXX.orphaned`.
- On every continuation, `metrics.jsonl` lines past the checkpoint's epoch move to
  `metrics.jsonl.orphaned`, and the effective overrides against `config.json` go to `resumes.jsonl`.

Everything here runs before the model loads, so a wrong resume costs seconds.
"""

from __future__ import annotations

import errno
import json
import math
import os
import secrets
import string
import time
from dataclasses import dataclass, field
from typing import Any

import ml_collections
from accelerate.logging import get_logger
from accelerate.utils import broadcast_object_list

from flow_grpo.run import checkpoint_files
from flow_grpo.run.files import open_to_write
from flow_grpo.run.config_checks import ConfigError, check_run_name

logger = get_logger(__name__)

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
RESUMES_FILE = "resumes.jsonl"
WANDB_ID_FILE = "wandb_id.txt"
ORPHANED_SUFFIX = ".orphaned"
PARENT_KEY = "parent_checkpoint"
"""Top-level key of a branch's `config.json` naming the checkpoint it started from."""

IGNORED_KEYS = ("run_name", "logdir", "resume_from", "resume_overwrite", PARENT_KEY)
"""Keys that differ between runs without changing the training (never reported as overrides)."""

FIXED_KEYS = (
    "algorithm",
    "pretrained.model",
    "pretrained.family",
    "pretrained.revision",
    "train.lora_rank",
    "train.lora_alpha",
    "train.ema",
    "sample.group_size",
)
"""Keys a resume cannot change: the restored LoRA, EMA or groups would be silently wrong."""

@dataclass
class RunPlan:
    """Where a run writes and what it starts from.

    Attributes:
        run_dir: the directory the run writes to.
        run_name: its name (the last component of `run_dir`; the tracker run's name).
        checkpoint: checkpoint directory to restore, or None for a fresh start.
        state: that checkpoint's loaded `state.pt`, or None.
        continues: True when the run continues an existing run directory (not fresh, not a branch).
        overrides: on a continuation, key -> {"was": recorded, "now": effective} against `config.json`.
    """

    run_dir: str
    run_name: str
    checkpoint: str | None = None
    state: dict[str, Any] | None = None
    continues: bool = False
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def epoch(self) -> int | None:
        """The epoch of the restored checkpoint, or None for a fresh start."""
        return None if self.state is None else int(self.state["epoch"])


def holds_run(path: str) -> bool:
    """True when `path` already holds a run: a complete checkpoint or a metrics line.

    A launch that failed before its first epoch leaves at most `config.json` (and empty
    directories): that is not yet a run, so the same command, once fixed, simply starts.
    """
    if checkpoint_files.list_checkpoints(path):
        return True
    metrics = os.path.join(path, METRICS_FILE)
    if not os.path.isfile(metrics):
        return False
    with open(metrics, "rb") as f:
        return any(line.strip() for line in f)


def default_run_name(logdir: str) -> str:
    """A timestamp name not yet used in `logdir`, made on the main process and broadcast to all.

    Every process must call this; they all get the main process's name (their clocks may differ).
    """
    name = [_unused_name(logdir, time.strftime("run-%Y%m%d-%H%M%S"))]
    broadcast_object_list(name, from_process=0)
    return name[0]


def _unused_name(logdir: str, name: str) -> str:
    """`name`, or `name-2`, `name-3`, ... : the first that is not a directory of `logdir`."""
    candidate, number = name, 2
    while os.path.exists(os.path.join(logdir, candidate)):
        candidate, number = f"{name}-{number}", number + 1
    return candidate


def _unused_path(path: str) -> str:
    """`path`, or `path-2`, `path-3`, ...: the first that does not exist (set-aside names never collide)."""
    candidate, number = path, 2
    while os.path.lexists(candidate):
        candidate, number = f"{path}-{number}", number + 1
    return candidate


def _latest_run(logdir: str) -> str:
    runs = [os.path.join(logdir, name) for name in os.listdir(logdir)] if os.path.isdir(logdir) else []
    runs = [path for path in runs if os.path.isdir(path) and checkpoint_files.list_checkpoints(path)]
    if not runs:
        raise ConfigError(f"config.resume_from='latest': no run with checkpoints in config.logdir={logdir!r}")
    return max(runs, key=lambda path: os.path.getmtime(checkpoint_files.list_checkpoints(path)[-1]))


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{"a": {"b": 1}}` -> `{"a.b": 1}`; values are normalised through JSON (tuples become lists)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = json.loads(json.dumps(value))
    return flat


def config_overrides(recorded: dict[str, Any], config: ml_collections.ConfigDict) -> dict[str, dict[str, Any]]:
    """Keys whose effective value differs from the recorded `config.json`: key -> {"was", "now"}."""
    was, now = flatten(recorded), flatten(config.to_dict())
    keys = sorted(set(was) | set(now))
    return {
        key: {"was": was.get(key), "now": now.get(key)}
        for key in keys
        if was.get(key) != now.get(key) and key.split(".")[0] not in IGNORED_KEYS
    }


def _check_changes(config: ml_collections.ConfigDict, recorded: dict[str, Any], source: str) -> dict[str, dict[str, Any]]:
    overrides = config_overrides(recorded, config)
    for key in FIXED_KEYS:
        if key in overrides:
            change = overrides[key]
            raise ConfigError(
                f"config.{key} is {change['now']!r} but the run being resumed ({source}) was trained with "
                f"{change['was']!r}; a resume cannot change it. Set it back, or start a fresh run."
            )
    return overrides


def _check_not_finished(config: ml_collections.ConfigDict, run_dir: str, epoch: int) -> None:
    if epoch + 1 >= config.num_epochs:
        raise ConfigError(
            f"config.num_epochs: run {run_dir} already finished {epoch + 1} epochs (checkpoint of epoch {epoch}); "
            f"raise num_epochs above {epoch + 1} to continue it"
        )


def _load(path: str) -> dict[str, Any]:
    try:
        return checkpoint_files.load_checkpoint_state(path)
    except checkpoint_files.CheckpointError as error:
        raise ConfigError(
            f"config.resume_from: {error}; resume from an earlier checkpoint, or from the run directory "
            "(which takes its newest checkpoint that loads)"
        ) from None


def _newest(run_dir: str) -> tuple[str, dict[str, Any]]:
    try:
        return checkpoint_files.newest_loadable(run_dir)
    except FileNotFoundError as error:
        raise ConfigError(
            f"config.resume_from: {error}; restore a checkpoint from a copy, or start a fresh run with another --config.run_name"
        ) from None


def _check_lora_rank(config: ml_collections.ConfigDict, checkpoint: str, state: dict[str, Any]) -> None:
    """Every LoRA tensor of `state` has the rank `config.train.lora_rank` (known before the model loads).

    peft's `lora_A` weights are `(rank, in, ...)` and `lora_B` weights `(out, rank, ...)`; the other
    dimensions are the model's, checked when the state is restored into it.
    """
    rank = config.train.lora_rank
    for name, tensor in state["lora"].items():
        dim = 0 if ".lora_A." in name else 1 if ".lora_B." in name else None
        if dim is not None and (tensor.dim() < 2 or tensor.shape[dim] != rank):
            raise ConfigError(
                f"config.resume_from: {os.path.join(checkpoint, checkpoint_files.STATE_FILE)}: LoRA tensor {name} has "
                f"shape {tuple(tensor.shape)}, not rank {rank} (config.train.lora_rank); resume with the "
                "train.lora_rank it was trained with, or from a checkpoint this trainer wrote"
            )


def _read_config(run_dir: str) -> dict[str, Any]:
    path = os.path.join(run_dir, CONFIG_FILE)
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            recorded = json.load(f)
    except (ValueError, UnicodeDecodeError) as error:
        raise ConfigError(
            f"{path} is truncated or not JSON ({error}); restore it from a copy, or start a fresh run "
            "with another --config.run_name"
        ) from None
    if not isinstance(recorded, dict):
        raise ConfigError(f"{path} holds {type(recorded).__name__}, not a config object; restore it or start a fresh run")
    return recorded


def plan_run(config: ml_collections.ConfigDict, run_name: str) -> RunPlan:
    """Decide the run directory and the checkpoint to restore; read-only, runs on every process.

    Args:
        config: the training config.
        run_name: `config.run_name`, or the broadcast default name when that is empty.

    Raises:
        ConfigError: an existing run without resume, a missing or unloadable checkpoint, a finished
            run, or a change of a key in `FIXED_KEYS`; the message says what to do.
    """
    check_run_name(run_name)
    logdir, source = config.logdir, config.resume_from
    if not source:
        run_dir = os.path.join(logdir, run_name)
        if holds_run(run_dir):
            raise ConfigError(
                f"config.run_name: {run_dir} already holds a run. Continue it with --config.resume_from={run_dir} "
                "(or --config.resume_from=latest), or choose another --config.run_name."
            )
        return RunPlan(run_dir, run_name)
    if source == "latest":
        source = os.path.join(logdir, config.run_name) if config.run_name else _latest_run(logdir)
        if not os.path.isdir(source):
            raise ConfigError(f"config.resume_from='latest': run directory {source} does not exist")
    source = os.path.normpath(source)
    if os.path.isfile(os.path.join(source, checkpoint_files.STATE_FILE)):
        checkpoint, state = source, _load(source)
        parent_run = os.path.dirname(os.path.dirname(source))
        in_run = os.path.basename(os.path.dirname(source)) == "checkpoints"
        newest = in_run and _newest(parent_run)[0] == source
    else:
        parent_run = source
        checkpoint, state = _newest(source)
        in_run = newest = True
    epoch = int(state["epoch"])
    wanted = config.run_name or os.path.basename(parent_run)
    same_name = in_run and wanted == os.path.basename(parent_run)
    if in_run and same_name and (newest or config.resume_overwrite):
        overrides = _check_changes(config, _read_config(parent_run), parent_run)
        _check_lora_rank(config, checkpoint, state)
        _check_not_finished(config, parent_run, epoch)
        return RunPlan(parent_run, os.path.basename(parent_run), checkpoint, state, True, overrides)
    # A branch: a new run directory starting from the checkpoint.
    if config.run_name and not same_name:
        name = config.run_name
        if holds_run(os.path.join(logdir, name)):
            raise ConfigError(f"config.run_name: {os.path.join(logdir, name)} already holds a run; choose another name")
    else:
        name = _unused_name(logdir, f"{wanted}-from-epoch_{epoch:05d}")
    if in_run:
        _check_changes(config, _read_config(parent_run), parent_run)
    _check_lora_rank(config, checkpoint, state)
    _check_not_finished(config, os.path.join(logdir, name), epoch)
    logger.info(f"branching: {checkpoint} is not the newest checkpoint of its run; the new run is {name}")
    return RunPlan(os.path.join(logdir, name), name, checkpoint, state)


def prepare(plan: RunPlan, config: ml_collections.ConfigDict) -> None:
    """Write the run's records on the main process (call after every process has planned).

    Fresh run or branch: `config.json` (a branch also records `parent_checkpoint` and gets the
    parent's metrics up to the checkpoint's epoch). Continuation: `config.json` stays unchanged;
    later metrics lines and later checkpoints are set aside as `.orphaned`, and the overrides are
    appended to `resumes.jsonl`.

    Raises:
        ConfigError: the run directory cannot be written (a read-only or foreign `config.logdir`).
    """
    try:
        _write_records(plan, config)
    except PermissionError as error:
        raise ConfigError(
            f"config.logdir: cannot write {error.filename or plan.run_dir} ({error.strerror}); "
            "choose a writable --config.logdir or fix its permissions"
        ) from None
    except OSError as error:
        if error.errno != errno.EROFS:
            raise
        raise ConfigError(f"config.logdir: {plan.run_dir} is on a read-only file system; choose a writable --config.logdir") from None


def _write_records(plan: RunPlan, config: ml_collections.ConfigDict) -> None:
    os.makedirs(plan.run_dir, exist_ok=True)
    if plan.continues:
        assert plan.checkpoint is not None and plan.epoch is not None
        for later in checkpoint_files.list_checkpoints(plan.run_dir):
            if _epoch_of(later) > plan.epoch:
                aside = _unused_path(later + ORPHANED_SUFFIX)
                logger.warning(f"setting aside {later} (later than the resumed epoch {plan.epoch}) as {aside}")
                os.replace(later, aside)
        cut_metrics(plan.run_dir, plan.epoch)
        record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "checkpoint": plan.checkpoint, "epoch": plan.epoch}
        with open_to_write(os.path.join(plan.run_dir, RESUMES_FILE), "a") as f:
            f.write(json.dumps(record | {"overrides": plan.overrides}) + "\n")
        if plan.overrides:
            logger.info(f"resume overrides (recorded in {RESUMES_FILE}): {plan.overrides}")
        return
    recorded = json.loads(config.to_json())
    recorded["run_name"] = plan.run_name
    if plan.checkpoint is not None:
        recorded[PARENT_KEY] = plan.checkpoint
        parent_metrics = os.path.join(os.path.dirname(os.path.dirname(plan.checkpoint)), METRICS_FILE)
        if os.path.isfile(parent_metrics):
            kept, _ = _split_metrics(parent_metrics, plan.epoch)
            with open_to_write(os.path.join(plan.run_dir, METRICS_FILE), "w") as f:
                f.writelines(kept)
    with open_to_write(os.path.join(plan.run_dir, CONFIG_FILE), "w") as f:
        json.dump(recorded, f, indent=2)


def _epoch_of(checkpoint: str) -> int:
    match = checkpoint_files.CHECKPOINT_PATTERN.match(os.path.basename(checkpoint))
    assert match is not None
    return int(match.group(1))


def _split_metrics(path: str, epoch: int) -> tuple[list[str], list[str]]:
    """Lines of `path` with epoch <= `epoch`, and the later ones (lines that do not parse go to the later)."""
    kept, later = [], []
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            try:
                row_epoch = int(json.loads(line)["epoch"])
            except (ValueError, KeyError, TypeError):
                row_epoch = epoch + 1
            (kept if row_epoch <= epoch else later).append(line if line.endswith("\n") else line + "\n")
    return kept, later


def cut_metrics(run_dir: str, epoch: int) -> int:
    """Move the `metrics.jsonl` lines past `epoch` to `metrics.jsonl.orphaned`; returns how many moved."""
    path = os.path.join(run_dir, METRICS_FILE)
    if not os.path.isfile(path):
        return 0
    kept, later = _split_metrics(path, epoch)
    if later:
        with open_to_write(path + ORPHANED_SUFFIX, "a") as f:
            f.writelines(later)
        with open_to_write(path + ".part", "w") as f:
            f.writelines(kept)
        os.replace(path + ".part", path)
        logger.warning(f"moved {len(later)} metrics lines past epoch {epoch} to {path}{ORPHANED_SUFFIX}")
    return len(later)


def metrics_line(metrics: dict[str, Any]) -> str:
    """One strict-JSON line: NaN/inf values are written as null and their keys listed under `nonfinite`."""
    bad = sorted(key for key, value in metrics.items() if isinstance(value, float) and not math.isfinite(value))
    row = {key: (None if key in bad else value) for key, value in metrics.items()}
    if bad:
        row["nonfinite"] = bad
    return json.dumps(row, allow_nan=False) + "\n"


def append_metrics(run_dir: str, metrics: dict[str, Any]) -> None:
    """Append `metrics` as one strict-JSON line to `<run_dir>/metrics.jsonl` (never through a symlink)."""
    with open_to_write(os.path.join(run_dir, METRICS_FILE), "a") as f:
        f.write(metrics_line(metrics))


def wandb_id(plan: RunPlan) -> str:
    """The wandb run id of this run: read from `wandb_id.txt` when continuing, else made and written there."""
    path = os.path.join(plan.run_dir, WANDB_ID_FILE)
    if plan.continues and os.path.isfile(path):
        with open(path) as f:
            return f.read().strip()
    run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
    with open_to_write(path, "w") as f:
        f.write(run_id + "\n")
    return run_id
