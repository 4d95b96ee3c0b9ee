"""Presets, locked overrides and the validation that runs before any model is loaded."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import ml_collections
import pytest

from flow_grpo.run.config_checks import ConfigError, derive_layout, validate_config

ROOT = Path(__file__).resolve().parents[1]


def _load_presets():
    spec = importlib.util.spec_from_file_location("presets_under_test", ROOT / "config" / "grpo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


presets = _load_presets()
PRESET_NAMES = [
    "pickscore_sd3",
    "geneval_sd3",
    "ocr_sd3",
    "ocr_sd3_basic",
    "pickscore_sd3_flow_grpo",
    "geneval_sd3_flow_grpo",
    "ocr_sd3_flow_grpo",
    "tiny_tp_grpo",
    "tiny_flow_grpo",
    "pickscore_flux",
    "geneval_flux",
    "ocr_flux",
    "pickscore_flux_flow_grpo",
    "geneval_flux_flow_grpo",
    "ocr_flux_flow_grpo",
    "tiny_flux",
    "tiny_flux_flow_grpo",
]


def tiny() -> ml_collections.ConfigDict:
    return presets.tiny_tp_grpo()


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_every_preset_loads_and_has_valid_arithmetic(name: str) -> None:
    config = presets.get_config(name)
    assert config.is_locked
    # The published SD3 batch arithmetic must work on 1, 8 and 32 GPUs... where it divides.
    world_sizes = [1] if name.startswith("tiny") else [1, 4, 8, 16]
    for world_size in world_sizes:
        derive_layout(config, world_size)


def test_published_sd3_settings() -> None:
    config = presets.pickscore_sd3()
    assert config.algorithm == "tp_grpo" and config.sample.step_kind == "cps"
    assert (config.sample.num_steps, config.sample.eval_num_steps) == (10, 40)
    assert (config.sample.window_size, tuple(config.sample.window_range)) == (9, (0, 9))
    assert (config.sample.noise_level, config.sample.guidance_scale) == (0.7, 4.5)
    assert (config.sample.group_size, config.sample.prompts_per_epoch, config.sample.batch_size) == (24, 48, 9)
    assert (config.train.lora_rank, config.train.lora_alpha, config.train.learning_rate) == (32, 64, 3e-4)
    assert (config.train.clip_range, config.train.adv_clip_max, config.train.beta) == (1e-5, 5.0, 1e-4)
    assert (config.train.ema_decay, config.train.ema_every, config.mixed_precision) == (0.9, 8, "fp16")
    assert config.tp.consistent and config.tp.first_step and config.tp.balance
    assert presets.pickscore_sd3_flow_grpo().algorithm == "flow_grpo"
    assert not presets.ocr_sd3_basic().tp.consistent
    layout = derive_layout(config, 32)
    assert layout.sample_batches_per_epoch == 4 and layout.gradient_accumulation_steps == 2 * 9


def test_published_flux_settings() -> None:
    config = presets.pickscore_flux()
    assert (config.pretrained.family, config.mixed_precision) == ("flux", "bf16")
    assert (config.sample.num_steps, config.sample.eval_num_steps, config.sample.guidance_scale) == (6, 28, 3.5)
    assert (config.sample.window_size, tuple(config.sample.window_range)) == (5, (0, 5))
    assert (config.train.lora_rank, config.train.lora_alpha) == (64, 128)
    for name in ("geneval_flux", "ocr_flux", "pickscore_flux_flow_grpo"):
        preset = presets.get_config(name)
        assert preset.sample.window_range[1] <= preset.sample.num_steps - 1


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_global_batch_per_update_does_not_depend_on_the_world_size(family: str) -> None:
    config = presets.get_config(f"pickscore_{family}")
    per_update = {}
    for world_size in (8, 32):
        layout = derive_layout(config, world_size)
        micro_batches = layout.gradient_accumulation_steps // config.sample.window_size
        per_update[world_size] = world_size * micro_batches * config.train.batch_size
        assert layout.trajectories_per_epoch == 48 * 24
    assert per_update[8] == per_update[32] == 48 * 24 // 2
    # FLUX trains 3 trajectories per micro-batch: 4x the world size, 1/4 of the accumulation.
    if family == "flux":
        assert derive_layout(config, 8).gradient_accumulation_steps == 24 * 5
        assert derive_layout(config, 32).gradient_accumulation_steps == 6 * 5


def test_unknown_preset() -> None:
    with pytest.raises(ValueError, match="unknown preset 'nope'.*pickscore_sd3"):
        presets.get_config("nope")


def test_config_is_locked_against_typos() -> None:
    config = tiny()
    with pytest.raises(AttributeError):
        config.sample.noise_levle = 0.5
    with pytest.raises(AttributeError):
        config.reward_fn.pickscor = 1.0


def _run_entry(*flags: str) -> subprocess.CompletedProcess:
    code = (
        "from absl import app, flags\n"
        "from ml_collections import config_flags\n"
        "C = config_flags.DEFINE_config_file('config', 'config/grpo.py:tiny_tp_grpo')\n"
        "def main(_):\n"
        "    print('noise', C.value.sample.noise_level, 'reward', dict(C.value.reward_fn))\n"
        "app.run(main)\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code, *flags], cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def test_command_line_overrides_work_and_typos_fail() -> None:
    ok = _run_entry("--config=config/grpo.py:tiny_tp_grpo", "--config.sample.noise_level=0.5")
    assert ok.returncode == 0, ok.stderr
    assert "noise 0.5" in ok.stdout
    typo = _run_entry("--config=config/grpo.py:tiny_tp_grpo", "--config.sample.noise_levle=0.5")
    assert typo.returncode != 0 and "noise_levle" in typo.stderr
    reward_typo = _run_entry("--config=config/grpo.py:tiny_tp_grpo", "--config.reward_fn.jpeg_compresibility=1.0")
    assert reward_typo.returncode != 0


CASES = [
    ("sample.batch_size", 5, r"config\.sample\.batch_size: .*16.*multiple of world_size x sample\.batch_size"),
    ("train.batch_size", 5, r"config\.train\.batch_size: 16 trajectories per process are not a multiple of 5"),
    ("train.updates_per_epoch", 3, r"config\.train\.updates_per_epoch: 2 training micro-batches"),
    ("sample.window_range", (0, 6), r"config\.sample\.window_range: .*reach the last step 5"),
    ("sample.window_range", (1, 7), r"config\.sample\.window_range: \(1, 7\) leaves the step range"),
    ("sample.window_size", 6, r"config\.sample\.window_size: a window of 6 steps does not fit"),
    ("sample.step_kind", "ddim", r"config\.sample\.step_kind: unknown step kind 'ddim'"),
    ("sample.noise_level", 1.5, r"config\.sample\.noise_level: 1\.5 is outside \[0, 1\]"),
    ("sample.noise_level", -0.1, r"config\.sample\.noise_level: -0\.1 is outside"),
    ("sample.group_size", 1, r"config\.sample\.group_size: is 1.*2 or more"),
    ("sample.resolution", 60, r"config\.sample\.resolution: 60 is not a multiple of 16"),
    ("algorithm", "ppo", r"config\.algorithm: unknown algorithm 'ppo'"),
    ("mixed_precision", "fp8", r"config\.mixed_precision: unknown value 'fp8'"),
    ("pretrained.family", "sdxl", r"config\.pretrained\.family: unknown model family 'sdxl'"),
    ("train.clip_range", 0.0, r"config\.train\.clip_range: must be positive"),
    ("train.ema_decay", 1.5, r"config\.train\.ema_decay: must be in \(0, 1\)"),
    ("report_to", "no_such_tracker", r"config\.report_to: unknown tracker"),
    ("eval_before_training", True, r"config\.eval_before_training: is True but config\.eval_freq is 0"),
    ("num_epochs", 0, r"config\.num_epochs: must be a positive integer, got 0"),
    ("eval_freq", -1, r"config\.eval_freq: must be 0 or more"),
    ("save_freq", -1, r"config\.keep_checkpoints / save_freq / log_images: must be 0 or more"),
    ("reward_fn.jpeg_compressibility", float("nan"), r"config\.reward_fn\.jpeg_compressibility: weight nan is not a finite"),
    ("eval_reward_fn.jpeg_compressibility", float("inf"), r"config\.eval_reward_fn\.jpeg_compressibility: weight inf"),
    ("reward_fn.jpeg_compressibility", 0.0, r"config\.reward_fn: every weight is 0"),
    ("reward_fn.jpeg_compressibility", -1.0, r"config\.reward_fn: negative weights .*allow_negative_reward_weights=True"),
    # NaN passes every `<` bound: each float key is checked for finiteness first, naming the key.
    ("train.beta", float("nan"), r"config\.train\.beta: must be a finite number, got nan"),
    ("sample.guidance_scale", float("nan"), r"config\.sample\.guidance_scale: must be a finite number"),
    ("train.learning_rate", float("nan"), r"config\.train\.learning_rate: must be a finite number"),
    ("train.learning_rate", float("inf"), r"config\.train\.learning_rate: must be a finite number, got inf"),
    ("train.clip_range", float("nan"), r"config\.train\.clip_range: must be a finite number"),
    ("train.adv_clip_max", float("nan"), r"config\.train\.adv_clip_max: must be a finite number"),
    ("train.adam_beta2", 1.0, r"config\.train\.adam_beta2: 1\.0 is outside \[0, 1\)"),
    ("train.adam_epsilon", float("nan"), r"config\.train\.adam_epsilon: must be a finite number"),
    ("reward_options.remote.timeout", 0.0, r"config\.reward_options\.remote\.timeout: must be positive"),
    ("distributed_timeout_s", 0, r"config\.distributed_timeout_s: 0 is outside \(0, 604800\]"),
    # A timeout a timedelta cannot hold would end in an OverflowError when the process group starts.
    ("distributed_timeout_s", 10**14, r"config\.distributed_timeout_s: 100000000000000 is outside \(0, 604800\]"),
    ("pretrained.max_sequence_length", 0, r"config\.pretrained\.max_sequence_length: 0 is outside \[1, inf\)"),
    ("run_name", "../../escaped", r"config\.run_name: '\.\./\.\./escaped' is not a single directory name"),
    ("run_name", "/tmp/absolute", r"config\.run_name: '/tmp/absolute' is not a single directory name"),
    ("run_name", ".", r"config\.run_name: '\.' is not a single directory name"),
]


def test_an_infinite_clip_means_no_clip_and_is_accepted(tiny_sd3_real_dir) -> None:
    config = tiny()
    config.pretrained.model = tiny_sd3_real_dir
    config.train.adv_clip_max = float("inf")
    config.train.max_grad_norm = float("inf")
    validate_config(config)


@pytest.mark.parametrize("key,value,message", CASES, ids=[f"{c[0]}={c[1]}" for c in CASES])
def test_validation_errors_name_key_and_fix(key, value, message, tiny_sd3_real_dir) -> None:
    config = tiny()
    config.pretrained.model = tiny_sd3_real_dir
    config.train.ema = True
    *path, last = key.split(".")
    node = config
    for part in path:
        node = node[part]
    setattr(node, last, value)
    with pytest.raises(ConfigError, match=message):
        validate_config(config, world_size=1)


def test_validation_world_size_arithmetic() -> None:
    config = tiny()
    validate_config(config, world_size=2, check_paths=False)
    with pytest.raises(ConfigError, match="on 3 processes"):
        validate_config(config, world_size=3, check_paths=False)


def test_unknown_reward_is_rejected_before_loading() -> None:
    config = tiny()
    config.reward_fn = ml_collections.ConfigDict({"aesthetics": 1.0})
    with pytest.raises(ConfigError, match="aesthetics.*available rewards"):
        validate_config(config, check_paths=False)


def test_missing_model_directory_and_dataset() -> None:
    config = tiny()
    config.pretrained.model = "./does/not/exist"
    with pytest.raises(ConfigError, match=r"pretrained\.model: directory './does/not/exist' does not exist.*make tiny-model"):
        validate_config(config)
    config = tiny()
    config.pretrained.model = "stabilityai/stable-diffusion-3.5-medium"  # a hub id is not checked locally
    config.dataset = "dataset/missing"
    with pytest.raises(ConfigError, match=r"config\.dataset: directory 'dataset/missing' does not exist"):
        validate_config(config)


def test_negative_reward_weights_need_the_opt_in(tiny_sd3_real_dir) -> None:
    config = tiny()
    config.pretrained.model = tiny_sd3_real_dir
    config.reward_fn.jpeg_compressibility = -1.0
    config.allow_negative_reward_weights = True
    validate_config(config)


def test_empty_model_directory_is_rejected(tmp_path) -> None:
    config = tiny()
    config.pretrained.model = str(tmp_path)
    with pytest.raises(ConfigError, match=r"pretrained\.model: directory .* is empty"):
        validate_config(config)


def test_test_split_is_required_only_when_evaluating(tmp_path, tiny_sd3_real_dir) -> None:
    (tmp_path / "train.txt").write_text("a red bicycle\na quiet harbour\n")
    config = tiny()
    config.pretrained.model = tiny_sd3_real_dir
    config.dataset = str(tmp_path)
    config.eval_freq = 0
    validate_config(config)  # trains without a test split
    config.eval_freq = 1
    with pytest.raises(ConfigError, match=r"config\.dataset: No prompt file for split 'test'.*eval_freq=0"):
        validate_config(config)


def _train_entry(*flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "flow_grpo.train", *flags], cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled"},
    )


def test_config_errors_print_the_message_and_exit_2(tmp_path, tiny_sd3_dir) -> None:
    preset = "--config=config/grpo.py:tiny_tp_grpo"
    typo = _train_entry(preset, "--config.sample.noise_levle=0.5")
    assert typo.returncode == 2 and "Traceback" not in typo.stderr
    assert 'Did you mean "noise_level"' in typo.stderr
    from flow_grpo.commands.errors import unknown_key_message

    with pytest.raises(AttributeError) as caught:
        tiny().reward_fn.get_type("pickscore")  # what ml_collections raises for --config.reward_fn.pickscore
    message = unknown_key_message(["train", preset, "--config.reward_fn.pickscore=1.0"], caught.value)
    assert """--config.reward_fn='{"pickscore": 1.0}'""" in message
    # The suggested form works: the flags parse and the config is validated.
    invalid = _train_entry(
        preset,
        '--config.reward_fn={"jpeg_compressibility": 0.0}',
        f"--config.logdir={tmp_path}",
        f"--config.pretrained.model={tiny_sd3_dir}",
    )
    assert invalid.returncode == 2 and "Traceback" not in invalid.stderr
    assert "config.reward_fn: every weight is 0" in invalid.stderr
