"""FLUX through the shared trainer: both algorithms train the tiny FLUX model and raise its reward."""

from __future__ import annotations

import pytest
import torch

from flow_grpo.testing import save_tiny_pipeline
from flow_grpo.training.trainer import Trainer
from tests.test_trainer import tiny_config


@pytest.fixture(scope="module")
def tiny_flux_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny-flux-train"), "flux", "minimal")


@pytest.mark.parametrize("preset", ["tiny_flux", "tiny_flux_flow_grpo"])
def test_tiny_flux_training_changes_lora_and_raises_reward(preset, tiny_flux_model, tmp_path) -> None:
    config = tiny_config(tiny_flux_model, tmp_path, preset, num_epochs=12, **{"sample.prompts_per_epoch": 8})
    assert config.pretrained.family == "flux" and config.sample.guidance_scale == 3.5
    trainer = Trainer(config)
    named = dict(trainer.adapter.transformer.named_parameters())
    before = {name: p.detach().clone() for name, p in named.items()}
    history = trainer.train()
    changed = {name for name, p in named.items() if not torch.equal(before[name], p.detach())}
    assert changed and all("lora_" in name for name in changed)
    assert abs(history[0]["train/ratio_first"] - 1.0) < 1e-5
    rewards = [row["reward/jpeg_compressibility"] for row in history]
    assert sum(rewards[-3:]) / 3 - sum(rewards[:2]) / 2 > 0.025, rewards
    lora = tmp_path / "test" / "checkpoints" / "epoch_00011" / "lora" / "pytorch_lora_weights.safetensors"
    assert lora.exists()
