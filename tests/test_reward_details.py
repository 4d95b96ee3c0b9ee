"""Per-image reward details reach the trainer's metrics and the evaluation means (NaN = does not apply)."""

from __future__ import annotations

import math

import torch

from flow_grpo.rewards import jpeg_compressibility, register_reward
from flow_grpo.training.trainer import Trainer
from tests.test_trainer import tiny_config


class DetailedJpeg:
    """JPEG compressibility with two details: ``even`` (1 on even rows, NaN on odd ones) and ``never`` (all NaN)."""

    detail_names = ("even", "never")

    def __call__(self, images, prompts, metadata):
        num = images.shape[0]
        even = torch.where(torch.arange(num) % 2 == 0, 1.0, float("nan"))
        return {"score": jpeg_compressibility(images, prompts, metadata), "even": even, "never": torch.full((num,), float("nan"))}


register_reward("test_detailed_jpeg")(lambda device, options: DetailedJpeg())


def test_details_are_logged_over_the_images_they_apply_to(tiny_sd3_real_dir, tmp_path) -> None:
    rewards = {"test_detailed_jpeg": 1.0}
    config = tiny_config(
        tiny_sd3_real_dir, tmp_path, "tiny_flow_grpo", reward_fn=rewards, eval_reward_fn=rewards, eval_freq=1
    )
    trainer = Trainer(config)
    samples = trainer.sample_epoch(0)
    assert set(samples.rewards) == {"test_detailed_jpeg", "avg", "test_detailed_jpeg/even", "test_detailed_jpeg/never"}
    _, metrics = trainer.advantages(0, samples)
    assert metrics["reward/test_detailed_jpeg/even"] == 1.0  # the NaN rows are left out
    assert "reward/test_detailed_jpeg/never" not in metrics  # applies to no image
    assert math.isfinite(metrics["reward/avg"])  # details never enter the weighted sum

    result = trainer.score_test_prompts(keep_images=0)
    assert result.means["test_detailed_jpeg/even"] == 1.0 and math.isnan(result.means["test_detailed_jpeg/never"])
    assert set(result.nonfinite) == {"test_detailed_jpeg", "avg"}  # NaN details are not reported as failures
