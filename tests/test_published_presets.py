"""Every published preset runs one short CPU epoch through `<preset>,tiny` (config/grpo.py `_shrink_for_cpu`).

Stand-ins, all offline: the tiny pipeline of the preset's family (flow_grpo.testing); PickScore on a tiny
random CLIP; GenEval and OCR stay remote rewards, answered by a local reward server hosting GenEval's
real scorer on a tiny random DETR with tiny-CLIP colours, and, for OCR (no offline OCR engine), the
JPEG-compressibility scorer under the name `ocr`.
"""

from __future__ import annotations

import json

import pytest

from flow_grpo.run.config_checks import validate_config
from flow_grpo.reward_server.server import RewardServer, build_scorers
from flow_grpo.testing import save_tiny_pipeline
from flow_grpo.testing.rewards import save_tiny_clip, save_tiny_detector
from flow_grpo.training.trainer import Trainer
from tests.test_presets import TRAINED, presets
from tests.test_trainer import ROOT

GENEVAL_LABELS = ("clock", "orange", "bicycle", "dog", "chair", "umbrella", "cup", "book", "cat", "car")


@pytest.fixture(scope="module")
def tiny_stand_ins(tiny_sd3_dir, tmp_path_factory):
    """Model directories per family, the tiny CLIP, and a reward server hosting `geneval` and `ocr`."""
    directory = tmp_path_factory.mktemp("published-presets")
    clip = save_tiny_clip(directory / "clip")
    geneval_options = {
        "detector": save_tiny_detector(directory / "detr", labels=GENEVAL_LABELS),
        "color_model": clip,
        "threshold": 0.0,
        "counting_threshold": 0.0,
    }
    scorers = build_scorers(["geneval", "jpeg_compressibility"], "cpu", {"geneval": geneval_options})
    scorers["ocr"] = scorers.pop("jpeg_compressibility")
    models = {"sd3": tiny_sd3_dir}
    for family in ("flux", "flux2_klein", "z_image", "qwen_image"):
        models[family] = save_tiny_pipeline(directory / family, family, "minimal")
    with RewardServer(scorers, host="127.0.0.1", port=0) as server:
        yield models, clip, server.url


def _shrunk(name: str, stand_ins, logdir) -> object:
    models, clip, url = stand_ins
    config = presets.get_config(f"{name},tiny")
    config.pretrained.model = models[config.pretrained.family]
    config.reward_options.pickscore.model = config.reward_options.pickscore.processor = clip
    config.reward_options.geneval.url = config.reward_options.ocr.url = url
    config.dataset = str(ROOT / config.dataset)
    config.logdir = str(logdir)
    config.run_name = name
    config.log_images = 0
    return config


def test_tiny_modifier_keeps_switches_window_geometry_and_batch_arithmetic() -> None:
    for name in TRAINED:
        full, tiny = presets.get_config(name), presets.get_config(f"{name},tiny")
        for key in ("algorithm", "tp", "sample.step_kind", "sample.noise_level", "sample.batch_size", "train.batch_size",
                    "train.updates_per_epoch", "train.beta", "train.ema", "eval_before_training", "pretrained.family"):
            node_full, node_tiny = full, tiny
            for part in key.split("."):
                node_full, node_tiny = node_full[part], node_tiny[part]
            assert node_full == node_tiny, (name, key)
        assert full.sample.num_steps - full.sample.window_size == tiny.sample.num_steps - tiny.sample.window_size
        assert full.sample.num_steps - full.sample.window_range[1] == tiny.sample.num_steps - tiny.sample.window_range[1]
        assert full.train.lora_alpha / full.train.lora_rank == tiny.train.lora_alpha / tiny.train.lora_rank
        assert tiny.num_epochs == 1 and tiny.sample.group_size >= 2
        assert validate_config(tiny, 1, check_paths=False).train_batches_per_epoch == tiny.train.updates_per_epoch
    with pytest.raises(ValueError, match="modifier 'small'"):
        presets.get_config("pickscore_sd3,small")


@pytest.mark.parametrize("name", sorted(TRAINED))
def test_published_preset_runs_one_tiny_epoch(name, tiny_stand_ins, tmp_path) -> None:
    history = Trainer(_shrunk(name, tiny_stand_ins, tmp_path)).train()
    (reward,) = presets.get_config(name).reward_fn
    assert [row["epoch"] for row in history] == [0]
    assert f"reward/{reward}" in history[0] and f"eval/{reward}" in history[0]
    assert "train/kl" in history[0]
    rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows] == [-1, 0]  # eval_before_training, then the epoch
