"""Validation of a training config and the per-process batch layout derived from the world size.

`validate_config` runs before any model is loaded, so a wrong setting costs seconds, not a model load.
Each error names the key and says what to change.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import ml_collections
from accelerate.tracking import LOGGER_TYPE_TO_CLASS, get_available_trackers

from flow_grpo.command_flags import UserInputError

ALGORITHMS = ("flow_grpo", "tp_grpo")
STEP_KINDS = ("sde", "cps")
MIXED_PRECISION = ("no", "fp16", "bf16")
NONFINITE = ("stop", "skip")


class ConfigError(UserInputError, ValueError):
    """A config value that cannot work; the message names the key and the fix."""


def check_report_to(report_to: str) -> None:
    """Fail unless `report_to` is `"none"` or an accelerate tracker whose package is installed.

    Raises:
        ConfigError: naming the supported and the installed trackers.
    """
    if report_to == "none":
        return
    installed = sorted(str(getattr(tracker, "value", tracker)) for tracker in get_available_trackers())
    if report_to not in LOGGER_TYPE_TO_CLASS:
        raise ConfigError(
            f"config.report_to: unknown tracker {report_to!r}. Use 'none' or one of accelerate's trackers "
            f"{sorted(LOGGER_TYPE_TO_CLASS)} (installed here: {installed or 'none'})."
        )
    if report_to not in installed:
        raise ConfigError(
            f"config.report_to: tracker {report_to!r} is not installed (installed here: {installed or 'none'}). "
            f"Install it (`pip install {report_to}`, or `pip install .[tensorboard]`) or set --config.report_to=none."
        )


@dataclass(frozen=True)
class Layout:
    """Batch arithmetic of one epoch for one process, derived from the config and the world size."""

    world_size: int
    trajectories_per_epoch: int  # global: prompts_per_epoch * group_size
    sample_batches_per_epoch: int  # per process
    trajectories_per_process: int
    train_batches_per_epoch: int  # per process: micro-batches of train.batch_size trajectories
    gradient_accumulation_steps: int  # backward passes (micro-batch x window step) per optimizer update


def _fail(key: str, problem: str, fix: str) -> None:
    raise ConfigError(f"config.{key}: {problem}; {fix[:1].lower()}{fix[1:]}" if fix else f"config.{key}: {problem}")


def _positive_int(config: ml_collections.ConfigDict, key: str) -> int:
    value = config
    for part in key.split("."):
        value = value[part]
    if not isinstance(value, int) or value < 1:
        _fail(key, f"must be a positive integer, got {value!r}", "Set it to 1 or more.")
    return value


def derive_layout(config: ml_collections.ConfigDict, world_size: int) -> Layout:
    """Derive the per-process batch layout; raises ConfigError when the numbers do not divide."""
    if world_size < 1:
        raise ConfigError(f"world size must be at least 1, got {world_size}")
    sample, train = config.sample, config.train
    for key in (
        "sample.group_size",
        "sample.prompts_per_epoch",
        "sample.batch_size",
        "train.batch_size",
        "train.updates_per_epoch",
    ):
        _positive_int(config, key)
    if sample.group_size < 2:
        _fail("sample.group_size", f"is {sample.group_size}", "GRPO normalises within a group: use 2 or more.")
    total = sample.prompts_per_epoch * sample.group_size
    per_step = world_size * sample.batch_size
    if total % per_step:
        _fail(
            "sample.batch_size",
            f"prompts_per_epoch x group_size = {sample.prompts_per_epoch} x {sample.group_size} = {total} "
            f"trajectories do not split into batches of {sample.batch_size} on {world_size} processes "
            f"({world_size} x {sample.batch_size} = {per_step})",
            "Choose sample.batch_size, sample.prompts_per_epoch or sample.group_size so that the total "
            "is a multiple of world_size x sample.batch_size.",
        )
    per_process = total // world_size
    if per_process % train.batch_size:
        _fail(
            "train.batch_size",
            f"{per_process} trajectories per process are not a multiple of {train.batch_size}",
            "Choose a train.batch_size that divides the trajectories per process.",
        )
    train_batches = per_process // train.batch_size
    if train_batches % train.updates_per_epoch:
        _fail(
            "train.updates_per_epoch",
            f"{train_batches} training micro-batches per process do not split into "
            f"{train.updates_per_epoch} updates",
            "Choose a value that divides the number of micro-batches "
            "(trajectories per process / train.batch_size).",
        )
    accumulation = train_batches // train.updates_per_epoch * sample.window_size
    return Layout(
        world_size=world_size,
        trajectories_per_epoch=total,
        sample_batches_per_epoch=total // per_step,
        trajectories_per_process=per_process,
        train_batches_per_epoch=train_batches,
        gradient_accumulation_steps=accumulation,
    )


def _check_window(config: ml_collections.ConfigDict) -> None:
    sample = config.sample
    steps = _positive_int(config, "sample.num_steps")
    _positive_int(config, "sample.eval_num_steps")
    window = _positive_int(config, "sample.window_size")
    window_range = tuple(sample.window_range)
    if len(window_range) != 2 or not all(isinstance(v, int) for v in window_range):
        _fail("sample.window_range", f"must be two integers (r0, r1), got {sample.window_range!r}", "")
    low, high = window_range
    if low < 0 or high > steps:
        _fail(
            "sample.window_range",
            f"({low}, {high}) leaves the step range 0..{steps}",
            f"Use 0 <= r0 and r1 <= sample.num_steps ({steps}).",
        )
    if high - window < low:
        _fail(
            "sample.window_size",
            f"a window of {window} steps does not fit in the range ({low}, {high})",
            f"Use window_size <= {high - low} or widen sample.window_range.",
        )
    if high > steps - 1:
        _fail(
            "sample.window_range",
            f"({low}, {high}) lets the window reach the last step {steps - 1}, whose next sigma is 0: "
            "it has no noise and can never be trained (0/0 in the KL)",
            f"Use r1 <= sample.num_steps - 1 = {steps - 1}.",
        )


def validate_config(config: ml_collections.ConfigDict, world_size: int = 1, *, check_paths: bool = True) -> Layout:
    """Check every setting that can be checked without loading a model; return the batch layout.

    Args:
        config: the training config (see `config/base.py`).
        world_size: number of processes of the job.
        check_paths: also check that a local model directory and the dataset exist.
    """
    check_numbers(config)
    _check_run(config)
    _check_sample(config)
    _check_completion(config)
    _check_window(config)
    check_model_and_resolution(config, check_path=check_paths)
    if check_paths:
        _check_dataset(config)
    _check_train(config)
    _check_rewards(config)
    return derive_layout(config, world_size)


INFINITE_ALLOWED = ("train.clip_range", "train.adv_clip_max", "train.max_grad_norm")
"""Float keys for which inf is a meaningful setting: a clip that clips nothing."""

# Bounded numeric keys: (key, low, high, low inclusive, high inclusive, fix); high None = unbounded.
BOUNDS = (
    # At most a week: far beyond any collective's wait, and far below what a timedelta can hold.
    ("distributed_timeout_s", 0, 604800, False, True, "Use a positive number of seconds up to 604800 (a week), e.g. 1800."),
    ("pretrained.max_sequence_length", 1, None, True, True, "Use a positive number of tokens, e.g. 128."),
    ("sample.guidance_scale", 0, None, True, True, "Use 0 or more (1 = no guidance)."),
    ("train.learning_rate", 0, None, False, True, "Use e.g. 3e-4."),
    ("train.adam_beta1", 0, 1, True, False, "Use a value in [0, 1), e.g. 0.9."),
    ("train.adam_beta2", 0, 1, True, False, "Use a value in [0, 1), e.g. 0.999."),
    ("train.adam_weight_decay", 0, None, True, True, "Use 0 or more, e.g. 1e-4."),
    ("train.adam_epsilon", 0, None, False, True, "Use a small positive number, e.g. 1e-8."),
    ("train.max_grad_norm", 0, None, True, True, "Use 0 (no clipping) or a positive norm, e.g. 1.0."),
    ("train.clip_range", 0, None, False, True, "Use e.g. 1e-5 (published)."),
    ("train.adv_clip_max", 0, None, False, True, "Use e.g. 5."),
    ("train.beta", 0, None, True, True, "Use 0 to skip the KL term."),
    ("train.lora_alpha", 0, None, False, True, "Use a positive number, e.g. twice the LoRA rank."),
    ("reward_options.clipscore_hessel.scale", 0, None, False, True, "Use e.g. 2.5 (Hessel et al.)."),
)


def _leaves(tree: dict, prefix: str = "") -> list[tuple[str, object]]:
    """(dotted key, value) of every leaf of a nested dict."""
    leaves = []
    for key, value in tree.items():
        if isinstance(value, dict):
            leaves.extend(_leaves(value, f"{prefix}{key}."))
        else:
            leaves.append((prefix + key, value))
    return leaves


def _range_problem(value: float, low: float, high: float | None, low_inclusive: bool, high_inclusive: bool) -> str:
    if high is None and low == 0:
        return f"must be {'0 or more' if low_inclusive else 'positive'}, got {value!r}"
    right = "inf)" if high is None else f"{high}{']' if high_inclusive else ')'}"
    return f"{value!r} is outside {'[' if low_inclusive else '('}{low}, {right}"


def check_numbers(config: ml_collections.ConfigDict) -> None:
    """Every float key finite (inf only where `INFINITE_ALLOWED`), every key of `BOUNDS` in its range.

    NaN compares false with every bound, so a NaN would otherwise pass any `value < low` check.
    Reward weights have their own check (`_check_reward_weights`).
    """
    values = dict(_leaves(config.to_dict()))
    for key, value in values.items():
        if key.split(".")[0] in ("reward_fn", "eval_reward_fn") or not isinstance(value, float):
            continue
        if math.isnan(value) or (math.isinf(value) and key not in INFINITE_ALLOWED):
            _fail(key, f"must be a finite number, got {value!r}", "Set it to a finite value (the default is in config/base.py).")
    remote = [(key, 0, None, key.endswith(".backoff"), True, "Use a number of seconds, e.g. 120.")
              for key in values if key.startswith("reward_options.") and key.endswith((".timeout", ".backoff"))]
    for key, low, high, low_inclusive, high_inclusive, fix in (*BOUNDS, *remote):
        value = values[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            _fail(key, f"must be a number, got {value!r}", fix)
        too_low = value < low if low_inclusive else value <= low
        too_high = high is not None and (value > high if high_inclusive else value >= high)
        if too_low or too_high:
            _fail(key, _range_problem(value, low, high, low_inclusive, high_inclusive), fix)
    if not isinstance(values["pretrained.max_sequence_length"], int):
        _fail("pretrained.max_sequence_length", "must be an integer number of tokens", "Use e.g. 128.")


def _check_run(config: ml_collections.ConfigDict) -> None:
    """Top-level keys: algorithm, precision, failure policy, epochs, evaluation, saving, resume, tracker."""
    if config.algorithm not in ALGORITHMS:
        _fail("algorithm", f"unknown algorithm {config.algorithm!r}", f"Use one of {ALGORITHMS}.")
    if config.mixed_precision not in MIXED_PRECISION:
        _fail("mixed_precision", f"unknown value {config.mixed_precision!r}", f"Use one of {MIXED_PRECISION}.")
    if config.nonfinite not in NONFINITE:
        _fail("nonfinite", f"unknown policy {config.nonfinite!r}", f"Use one of {NONFINITE}.")
    if config.keep_checkpoints < 0 or config.save_freq < 0 or config.log_images < 0:
        _fail("keep_checkpoints / save_freq / log_images", "must be 0 or more", "Use 0 to disable.")
    if config.eval_before_training and not config.eval_freq:
        _fail(
            "eval_before_training",
            "is True but config.eval_freq is 0 (evaluation is off)",
            "Set config.eval_freq to a positive number of epochs, or eval_before_training=False.",
        )
    if config.resume_from and config.resume_from != "latest" and not os.path.isdir(config.resume_from):
        _fail(
            "resume_from",
            f"directory {config.resume_from!r} does not exist",
            "Point it at logs/<run>, a checkpoint logs/<run>/checkpoints/epoch_XXXXX, or use 'latest'.",
        )
    check_run_name(config.run_name)
    _positive_int(config, "num_epochs")
    if config.eval_freq < 0:
        _fail("eval_freq", f"must be 0 or more, got {config.eval_freq}", "Use 0 to disable evaluation.")
    check_report_to(config.report_to)
    if config.attention_backend:
        from diffusers.models.attention_dispatch import AttentionBackendName

        names = sorted(b.value for b in AttentionBackendName)
        if config.attention_backend not in names:
            _fail("attention_backend", f"unknown backend {config.attention_backend!r}", f"Use '' or one of {names}.")


def check_run_name(run_name: str) -> None:
    """Fail unless `run_name` is empty (a timestamp name) or one path component inside `config.logdir`.

    Raises:
        ConfigError: for `..`, `.`, an absolute path, a separator or a NUL, which would write outside
            (or over) `config.logdir`.
    """
    if not isinstance(run_name, str):
        _fail("run_name", f"must be a string, got {run_name!r}", "Give a name such as 'sd3-pickscore'.")
    separators = {"/", "\\", os.sep, "\0"} | ({os.altsep} if os.altsep else set())
    if run_name in (".", "..") or any(character in run_name for character in separators):
        _fail(
            "run_name",
            f"{run_name!r} is not a single directory name (the run would be written outside config.logdir)",
            "Give one path component such as 'sd3-pickscore'; put the parent directory in config.logdir.",
        )


def _check_sample(config: ml_collections.ConfigDict) -> None:
    """`config.sample`: step kind, noise, guidance, call bounds and buckets, batch and image sizes."""
    sample = config.sample
    if sample.step_kind not in STEP_KINDS:
        _fail("sample.step_kind", f"unknown step kind {sample.step_kind!r}", f"Use one of {STEP_KINDS}.")
    if not 0.0 <= sample.noise_level <= 1.0:
        _fail("sample.noise_level", f"{sample.noise_level} is outside [0, 1]", "Use a value in [0, 1], e.g. 0.7.")
    if sample.noise_level == 0.0:
        _fail("sample.noise_level", "is 0: the window steps are deterministic", "Use a value in (0, 1].")
    if sample.max_states_per_call < 0:
        _fail("sample.max_states_per_call", "is negative", "Use 0 (no bound) or a positive number of states.")
    if sample.decode_chunk < 0:
        _fail("sample.decode_chunk", "is negative", "Use 0 (one VAE call) or a positive number of images per call.")
    buckets = tuple(sample.state_buckets)
    if buckets and (not all(isinstance(b, int) and b > 0 for b in buckets) or list(buckets) != sorted(set(buckets))):
        _fail("sample.state_buckets", f"{buckets!r} must be increasing positive integers", "E.g. (18, 36, 90).")
    if buckets and sample.max_states_per_call:
        _fail(
            "sample.state_buckets",
            "and sample.max_states_per_call are both set",
            "With buckets the largest bucket bounds a call; set max_states_per_call=0.",
        )
    _positive_int(config, "sample.eval_batch_size")
    _positive_int(config, "sample.resolution")


def _check_completion(config: ml_collections.ConfigDict) -> None:
    """`config.tp.completion_steps`: a non-negative integer, and only TP-GRPO completes window states."""
    steps = config.tp.completion_steps
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        _fail(
            "tp.completion_steps",
            f"must be a non-negative integer, got {steps!r}",
            "Use 0 (exact completions, the paper's method) or k >= 1 Euler steps per completion.",
        )
    if steps and config.algorithm != "tp_grpo":
        _fail(
            "tp.completion_steps",
            f"is {steps} but algorithm={config.algorithm!r} completes no window states",
            "Set tp.completion_steps=0, or algorithm='tp_grpo'.",
        )


def _check_train(config: ml_collections.ConfigDict) -> None:
    """`config.train`: LoRA rank and EMA (the float keys are checked by `check_numbers`)."""
    train = config.train
    _positive_int(config, "train.lora_rank")
    if train.ema:
        if not 0.0 < train.ema_decay < 1.0:
            _fail("train.ema_decay", f"must be in (0, 1), got {train.ema_decay}", "Use e.g. 0.9.")
        _positive_int(config, "train.ema_every")


def _check_rewards(config: ml_collections.ConfigDict) -> None:
    """Training and evaluation rewards: present, registered, with usable weights."""
    if not config.reward_fn:
        _fail("reward_fn", "is empty", "Give at least one {name: weight}, e.g. {'pickscore': 1.0}.")
    _check_reward_weights(config)
    from flow_grpo.rewards import check_reward_names

    try:
        check_reward_names(list(config.reward_fn.keys()))
        check_reward_names(list(config.eval_reward_fn.keys()))
    except ValueError as error:
        raise ConfigError(f"config.reward_fn / config.eval_reward_fn: {error}") from None


def _check_reward_weights(config: ml_collections.ConfigDict) -> None:
    for key in ("reward_fn", "eval_reward_fn"):
        for name, weight in config[key].items():
            if not isinstance(weight, (int, float)) or not math.isfinite(weight):
                _fail(f"{key}.{name}", f"weight {weight!r} is not a finite number", "Give a number, e.g. 1.0.")
    weights = dict(config.reward_fn)
    if weights and all(weight == 0 for weight in weights.values()):
        _fail("reward_fn", f"every weight is 0 ({weights})", "Give at least one reward a non-zero weight.")
    negative = {name: weight for name, weight in weights.items() if weight < 0}
    if negative and not config.allow_negative_reward_weights:
        _fail(
            "reward_fn",
            f"negative weights {negative} train the model to lower those rewards",
            "Use positive weights, or set config.allow_negative_reward_weights=True if that is intended.",
        )


def looks_like_local_path(name: str) -> bool:
    """True when `name` is meant as a directory rather than a hub id (`org/name`)."""
    return name.startswith((".", "/", "~")) or os.path.isabs(name) or name.count("/") != 1 or os.path.exists(name)


def check_model_and_resolution(config: ml_collections.ConfigDict, *, check_path: bool = True) -> None:
    """Check the model family, that a local model directory exists, and that the resolution fits the model.

    Shared by `validate_config` and the sampling tools (which need no dataset). A hub id is not checked.

    Args:
        config: a config with `pretrained.family`, `pretrained.model` and `sample.resolution`.
        check_path: also check that `pretrained.model` is set and, when it names a local
            directory, that the directory exists.

    Raises:
        ConfigError: naming the key and the fix.
    """
    from flow_grpo.models import ADAPTERS

    family = config.pretrained.family
    if family not in ADAPTERS:
        _fail("pretrained.family", f"unknown model family {family!r}", f"Use one of {sorted(ADAPTERS)}.")
    model = config.pretrained.model
    if check_path:
        _check_model_path(model)
    resolution = _positive_int(config, "sample.resolution")
    multiple = ADAPTERS[family].resolution_multiple(model)
    if resolution % multiple:
        _fail(
            "sample.resolution",
            f"{resolution} is not a multiple of {multiple} (VAE factor x token patch of this model)",
            f"Use a multiple of {multiple}, e.g. {max(multiple, resolution // multiple * multiple)}.",
        )


def _check_model_path(model: str) -> None:
    if not model:
        _fail("pretrained.model", "is empty", "Give a hub id (e.g. stabilityai/stable-diffusion-3.5-medium) or a directory.")
    if looks_like_local_path(model) and not os.path.isdir(os.path.expanduser(model)):
        _fail(
            "pretrained.model",
            f"directory {model!r} does not exist",
            "Point it at a diffusers pipeline directory or a hub id; for the tiny CPU presets run "
            "`make tiny-model` first.",
        )
    directory = os.path.expanduser(model)
    if os.path.isdir(directory) and os.listdir(directory) and not os.path.isfile(os.path.join(directory, "model_index.json")):
        _fail(
            "pretrained.model",
            f"directory {model!r} is not a diffusers pipeline (it has no model_index.json)",
            "Point it at the pipeline's top directory (the one with model_index.json), or give a hub id.",
        )
    if os.path.isdir(directory) and not os.listdir(directory):
        _fail(
            "pretrained.model",
            f"directory {model!r} is empty",
            "Point it at a diffusers pipeline directory (with model_index.json); an interrupted download "
            "leaves an empty one.",
        )
    if os.path.isdir(directory):
        _check_model_index(os.path.join(directory, "model_index.json"))


def _check_model_index(path: str) -> None:
    """A local pipeline's `model_index.json` is JSON and names no custom code.

    diffusers runs the `<name>.py` of a pipeline or component named `[<name>, <class>]` with another
    library than diffusers or transformers (`trust_remote_code`); the trainer never runs code that
    comes with a model, so such a pipeline is refused here, before anything loads.
    """
    problem = "is not a JSON object"
    try:
        with open(path, encoding="utf-8") as f:
            index = json.load(f)
    except (ValueError, UnicodeDecodeError) as error:
        index, problem = None, f"is truncated or not JSON ({error})"
    if not isinstance(index, dict):
        _fail("pretrained.model", f"{path} {problem}", "Restore the pipeline directory, e.g. download it again.")
    components = {key: entry for key, entry in index.items() if isinstance(entry, list) and entry}
    custom = {key: entry for key, entry in components.items() if entry[0] not in (None, "diffusers", "transformers")}
    if not isinstance(index.get("_class_name"), str):
        custom["_class_name"] = index.get("_class_name")
    if custom:
        _fail(
            "pretrained.model",
            f"{path} names custom code ({', '.join(f'{key}: {entry}' for key, entry in custom.items())})",
            "The trainer loads only diffusers and transformers classes and never runs code shipped with a model; "
            "use the model's standard diffusers pipeline.",
        )


def _check_dataset(config: ml_collections.ConfigDict) -> None:
    from flow_grpo.data import dataset_paths, load_prompts

    if not os.path.isdir(config.dataset):
        _fail("dataset", f"directory {config.dataset!r} does not exist", "Point it at a directory with train/test prompt files.")
    # The test split is read only when the run evaluates.
    for split in ("train", "test") if config.eval_freq else ("train",):
        try:
            path = dataset_paths(config.dataset, split)
        except FileNotFoundError as error:
            fix = "Add the file." if split == "train" else "Add the file, or set config.eval_freq=0 (no evaluation)."
            _fail("dataset", str(error).rstrip("."), fix)
        try:  # read now: a bad prompt file costs seconds, not a model load
            load_prompts(path)
        except ValueError as error:
            raise ConfigError(f"config.dataset: {error}") from None
