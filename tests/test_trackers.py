"""Tracker selection: any installed accelerate tracker works, others fail before the model loads; tensorboard gets
scalars, the eval grid, the TP plot and the d_j / g_j histograms; wandb options come from config keys."""

from __future__ import annotations

import glob

import pytest
from accelerate.tracking import get_available_trackers

from flow_grpo.run.config_checks import ConfigError
from flow_grpo.run.config_checks import check_report_to
from flow_grpo.run.trackers import init_kwargs
from flow_grpo.training.trainer import Trainer
from tests.test_trainer import tiny_config


def test_report_to_accepts_installed_trackers_and_names_the_rest() -> None:
    check_report_to("none")
    check_report_to("tensorboard")
    with pytest.raises(ConfigError, match=r"config\.report_to: unknown tracker 'tensorbord'.*tensorboard"):
        check_report_to("tensorbord")
    installed = {str(getattr(tracker, "value", tracker)) for tracker in get_available_trackers()}
    if "aim" not in installed:
        with pytest.raises(ConfigError, match=r"tracker 'aim' is not installed"):
            check_report_to("aim")


def test_unknown_tracker_fails_before_the_model_loads(tmp_path) -> None:
    config = tiny_config("/nonexistent/model", tmp_path, report_to="tensorbord")
    with pytest.raises(ConfigError, match="unknown tracker"):
        Trainer(config)


def test_wandb_options_come_from_config(tmp_path) -> None:
    config = tiny_config("/m", tmp_path)
    config.wandb.entity, config.wandb.group, config.wandb.tags, config.wandb.notes = "lab", "ablation", ("sd3", "tp"), "n"
    options = init_kwargs(config, "run", str(tmp_path))["wandb"]
    assert options == {"name": "run", "dir": str(tmp_path), "entity": "lab", "group": "ablation", "tags": ["sd3", "tp"], "notes": "n"}
    assert init_kwargs(tiny_config("/m", tmp_path), "run", str(tmp_path))["wandb"] == {"name": "run", "dir": str(tmp_path)}


def test_tensorboard_run_logs_scalars_images_and_histograms(tiny_sd3_dir, tmp_path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = tiny_config(tiny_sd3_dir, tmp_path, report_to="tensorboard", eval_freq=1, log_images=2)
    Trainer(config).train()
    events = EventAccumulator(str(tmp_path / "test" / "flow_grpo"), size_guidance={"images": 0, "histograms": 0})
    events.Reload()
    tags = events.Tags()
    assert "reward/avg" in tags["scalars"] and "eval/avg" in tags["scalars"]
    assert {"eval_images", "reward_curves"} <= set(tags["images"])
    assert {"tp/d_j", "tp/g_j"} <= set(tags["histograms"])
    assert glob.glob(str(tmp_path / "test" / "images" / "reward_curves_epoch_00000.png"))
