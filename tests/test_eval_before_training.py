"""`eval_before_training`: a fresh run's curve starts with the base model's evaluation, recorded as epoch -1."""

from __future__ import annotations

import json

import pytest

from flow_grpo.training.trainer import Trainer
from tests.test_trainer import tiny_config


@pytest.fixture
def trainer_with_tracker_log(tiny_sd3_dir, tmp_path):
    config = tiny_config(
        tiny_sd3_dir, tmp_path, "tiny_flow_grpo", eval_before_training=True, eval_freq=1, log_images=2, **{"train.ema": False}
    )
    trainer = Trainer(config)
    logged: list[tuple[int, dict]] = []
    trainer.accelerator.log = lambda values, step=None, **kwargs: logged.append((step, dict(values)))
    return trainer, logged


def test_fresh_run_evaluates_the_initial_lora_first(trainer_with_tracker_log, tmp_path) -> None:
    trainer, logged = trainer_with_tracker_log
    expected = trainer.evaluate(0)  # the initial LoRA (B = 0): the base model
    trainer.train()
    rows = [json.loads(line) for line in (tmp_path / "test" / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows] == [-1, 0]
    assert {key for key in rows[0] if key != "epoch"} == set(expected)
    assert rows[0]["eval/avg"] == expected["eval/avg"]
    assert rows[1]["eval/avg"] != expected["eval/avg"]  # the weights trained in epoch 0
    assert [step for step, _ in logged] == [0, 0]
    assert logged[0][1]["epoch"] == -1 and logged[1][1]["epoch"] == 0
    images = tmp_path / "test" / "images"
    assert (images / "eval_images_before_training.png").exists()
    assert not any(path.name.startswith("reward_curves") and "before" in path.name for path in images.iterdir())


def test_resumed_run_does_not_evaluate_before_training(trainer_with_tracker_log, tmp_path) -> None:
    trainer, logged = trainer_with_tracker_log
    trainer.start_epoch = 1  # as after loading the checkpoint of epoch 0; num_epochs is 1, so nothing runs
    assert trainer.train() == []
    assert logged == []
    assert not (tmp_path / "test" / "metrics.jsonl").exists()
