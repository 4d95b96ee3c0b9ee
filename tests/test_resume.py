"""Checkpoints, exact resume, crash safety, non-finite guards, LoRA export and offline reporting."""

from __future__ import annotations

import json
import os

import ml_collections
import pytest
import torch
from diffusers import StableDiffusion3Pipeline

from flow_grpo.run import checkpoint_files
from flow_grpo.rewards import registry
from flow_grpo.sampling.rollouts import sample_ode
from flow_grpo.training.trainer import NonFiniteError, Trainer
from tests.test_trainer import tiny_config

FAST = {"sample.prompts_per_epoch": 2, "train.beta": 0.01, "train.ema": True, "train.ema_every": 1}


def _lora(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in zip(trainer.trainable_names, trainer.trainable)}


def _without_times(row: dict) -> dict:
    return {key: value for key, value in row.items() if not key.startswith("time/")}


def test_resumed_run_matches_uninterrupted_run(tiny_sd3_dir, tmp_path) -> None:
    straight = Trainer(tiny_config(tiny_sd3_dir, tmp_path / "a", num_epochs=4, save_freq=1, **FAST))
    history = straight.train()

    first = Trainer(tiny_config(tiny_sd3_dir, tmp_path / "b", num_epochs=2, save_freq=1, **FAST))
    first.train()
    run_dir = str(tmp_path / "b" / "test")
    resumed = Trainer(tiny_config(tiny_sd3_dir, tmp_path / "b", num_epochs=4, save_freq=1, resume_from=run_dir, **FAST))
    assert resumed.start_epoch == 2
    resumed_history = resumed.train()

    assert [row["epoch"] for row in resumed_history] == [2, 3]
    for expected, got in zip(history[2:], resumed_history):
        assert _without_times(got) == _without_times(expected)
    for name, value in _lora(straight).items():
        assert torch.equal(_lora(resumed)[name], value), name
    for expected, got in zip(straight.ema.shadow, resumed.ema.shadow):
        assert torch.equal(expected, got)
    # metrics.jsonl of the resumed run holds all four epochs, appended as they ended.
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        assert [json.loads(line)["epoch"] for line in f] == [0, 1, 2, 3]


def test_a_full_disk_while_writing_names_the_path_and_keeps_the_last_good_checkpoint(tiny_sd3_dir, tmp_path, monkeypatch) -> None:
    trainer = Trainer(tiny_config(tiny_sd3_dir, tmp_path, num_epochs=2, save_freq=1, keep_checkpoints=1, **FAST))
    samples = trainer.sample_epoch(0)
    advantages, _ = trainer.advantages(0, samples)
    trainer.train_epoch(0, samples, advantages)
    good = trainer.save_checkpoint(0)
    saved_lora = _lora(trainer)
    samples = trainer.sample_epoch(1)
    trainer.train_epoch(1, samples, trainer.advantages(1, samples)[0])

    # A full disk: the state file's writes hit /dev/full (ENOSPC), as on a full file system.
    real_open = checkpoint_files.open_to_write

    def full_disk(target, mode="w"):
        return real_open("/dev/full", mode) if target.endswith(checkpoint_files.STATE_FILE + ".part") else real_open(target, mode)

    monkeypatch.setattr(checkpoint_files, "open_to_write", full_disk)
    with pytest.raises(OSError, match=r"no space left on device while writing .*epoch_00001\.tmp/state\.pt"):
        trainer.save_checkpoint(1)
    monkeypatch.undo()

    run_dir = str(tmp_path / "test")
    assert not os.path.exists(checkpoint_files.checkpoint_dir(run_dir, 1) + ".tmp")  # no half-written directory
    assert checkpoint_files.resolve_checkpoint(run_dir) == good
    resumed = Trainer(tiny_config(tiny_sd3_dir, tmp_path, num_epochs=2, resume_from=run_dir, **FAST))
    assert resumed.start_epoch == 1
    for name, value in saved_lora.items():
        assert torch.equal(_lora(resumed)[name], value)


def test_only_newest_checkpoints_are_kept(tiny_sd3_dir, tmp_path) -> None:
    Trainer(tiny_config(tiny_sd3_dir, tmp_path, num_epochs=3, save_freq=1, keep_checkpoints=2, **FAST)).train()
    kept = [os.path.basename(p) for p in checkpoint_files.list_checkpoints(str(tmp_path / "test"))]
    assert kept == ["epoch_00001", "epoch_00002"]


def test_resume_from_nothing_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="neither a checkpoint"):
        checkpoint_files.resolve_checkpoint(str(tmp_path))


@pytest.fixture
def nan_reward(monkeypatch):
    def make(device, options):
        return lambda images, prompts, metadata: torch.full((images.shape[0],), float("nan"))

    monkeypatch.setitem(registry._REGISTRY, "test_nan", make)


def test_nonfinite_rewards_stop_without_checkpoint(tiny_sd3_dir, tmp_path, nan_reward) -> None:
    config = tiny_config(tiny_sd3_dir, tmp_path, num_epochs=1, **FAST)
    config.reward_fn = ml_collections.ConfigDict({"test_nan": 1.0})
    with pytest.raises(NonFiniteError, match="epoch 0: non-finite rewards"):
        Trainer(config).train()
    assert checkpoint_files.list_checkpoints(str(tmp_path / "test")) == []


def test_nonfinite_rewards_can_skip_the_batch(tiny_sd3_dir, tmp_path, nan_reward) -> None:
    config = tiny_config(tiny_sd3_dir, tmp_path, num_epochs=1, nonfinite="skip", **FAST)
    config.reward_fn = ml_collections.ConfigDict({"test_nan": 1.0})
    trainer = Trainer(config)
    before = _lora(trainer)
    history = trainer.train()
    assert "train/loss" not in history[0] and trainer.optimizer_updates == 0
    assert all(torch.equal(before[name], value) for name, value in _lora(trainer).items())


def test_an_evaluation_where_every_score_is_nan_reports_counts_and_writes_strict_json(tiny_sd3_dir, tmp_path, nan_reward) -> None:
    config = tiny_config(tiny_sd3_dir, tmp_path, num_epochs=1, eval_freq=1, **FAST)
    config.eval_reward_fn = ml_collections.ConfigDict({"test_nan": 1.0})
    Trainer(config).train()
    strict = {"parse_constant": lambda name: pytest.fail(f"non-strict JSON constant {name}")}
    with open(tmp_path / "test" / "metrics.jsonl") as f:
        (row,) = [json.loads(line, **strict) for line in f]
    assert "eval/test_nan" not in row and "eval/avg" not in row  # no mean over zero finite scores, no null
    assert row["eval/test_nan_nonfinite"] == row["eval/avg_nonfinite"] == 12.0  # every test prompt
    lora = checkpoint_files.checkpoint_dir(str(tmp_path / "test"), 0) + "/lora/README.md"
    card = open(lora, encoding="utf-8").read()
    settings = json.loads(card.split("```json\n", 1)[1].split("\n```", 1)[0], **strict)
    assert settings["eval"] == {"test_nan": None, "avg": None}


def test_score_summaries_are_means_over_finite_scores_with_a_count(tmp_path) -> None:
    from flow_grpo.run.outputs import summarize_scores, write_json

    records = [{"r": 1.0}, {"r": float("nan")}, {"r": 3.0}, {"s": 0}]
    summary = summarize_scores(records[:3], ["r"])
    assert summary["r"] == {"mean": 2.0, "std": 1.0, "min": 1.0, "max": 3.0, "nonfinite": 1}
    empty = summarize_scores([{"r": float("nan")}], ["r"])["r"]
    assert empty["mean"] is None and empty["nonfinite"] == 1
    write_json(tmp_path / "s.json", {"x": float("inf"), "y": [float("nan")]})
    assert json.loads((tmp_path / "s.json").read_text()) == {"x": None, "y": [None]}


def test_exported_lora_reproduces_trained_images(tiny_sd3_dir, tmp_path) -> None:
    # alpha != rank: the export must carry the LoRA scale.
    config = tiny_config(
        tiny_sd3_dir, tmp_path, num_epochs=1, **{"sample.prompts_per_epoch": 2, "train.lora_alpha": 16}
    )
    trainer = Trainer(config)
    trainer.train()
    prompts = ["a red bicycle", "a quiet harbour"]
    noise = trainer.adapter.initial_latents(2, 32, torch.Generator().manual_seed(0))
    trained = sample_ode(trainer.adapter, trainer.adapter.encode_prompts(prompts), num_steps=4, resolution=32, initial_latents=noise)
    pipeline = StableDiffusion3Pipeline.from_pretrained(tiny_sd3_dir)
    pipeline.set_progress_bar_config(disable=True)
    kwargs = dict(prompt=prompts, latents=noise.clone(), num_inference_steps=4, guidance_scale=4.5, height=32,
                  width=32, max_sequence_length=64, output_type="pt")
    untrained = pipeline(**kwargs).images
    pipeline.load_lora_weights(os.path.join(str(tmp_path / "test"), "checkpoints", "epoch_00000", "lora"))
    exported = pipeline(**kwargs).images
    assert not torch.allclose(untrained, trained, atol=1e-4)  # training changed the images
    torch.testing.assert_close(exported, trained, rtol=1e-4, atol=1e-4)


def test_offline_wandb_run_directory_has_metrics_and_images(tiny_sd3_dir, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    config = tiny_config(tiny_sd3_dir, tmp_path, num_epochs=1, report_to="wandb", eval_freq=1, **FAST)
    Trainer(config).train()
    run_dir = tmp_path / "test"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows and "eval/avg" in rows[0] and "tp/tp_rate" in rows[0]
    images = sorted(os.listdir(run_dir / "images"))
    assert "eval_images_epoch_00000.png" in images and "reward_curves_epoch_00000.png" in images
    offline_runs = [d for d in os.listdir(run_dir / "wandb") if d.startswith("offline-run")]
    assert offline_runs
    files = [f for _, _, names in os.walk(run_dir / "wandb" / offline_runs[0]) for f in names]
    assert any(name.endswith(".wandb") for name in files)
    assert any(name.endswith(".png") for name in files)  # the logged images


def test_resume_applies_the_new_learning_rate_and_continues_the_wandb_run(tiny_sd3_dir, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    changes = dict(report_to="wandb", save_freq=1, **FAST)
    Trainer(tiny_config(tiny_sd3_dir, tmp_path, num_epochs=1, **changes)).train()
    run_dir = tmp_path / "test"
    config_before = (run_dir / "config.json").read_text()
    resumed = Trainer(
        tiny_config(tiny_sd3_dir, tmp_path, num_epochs=2, resume_from=str(run_dir), **{"train.learning_rate": 1e-3}, **changes)
    )
    assert [group["lr"] for group in resumed.optimizer.param_groups] == [1e-3]
    history = resumed.train()
    assert history[0]["train/learning_rate"] == 1e-3
    assert (run_dir / "config.json").read_text() == config_before
    resume = json.loads((run_dir / "resumes.jsonl").read_text())
    assert resume["overrides"]["train.learning_rate"] == {"was": 3e-2, "now": 1e-3}
    run_id = (run_dir / "wandb_id.txt").read_text().strip()
    offline_runs = sorted(d for d in os.listdir(run_dir / "wandb") if d.startswith("offline-run"))
    assert len(offline_runs) == 2 and all(d.endswith(f"-{run_id}") for d in offline_runs)  # one wandb run, resumed


def test_resume_from_an_older_checkpoint_trains_a_branch(tiny_sd3_dir, tmp_path) -> None:
    Trainer(tiny_config(tiny_sd3_dir, tmp_path, num_epochs=3, save_freq=1, keep_checkpoints=0, **FAST)).train()
    parent = tmp_path / "test"
    parent_metrics = (parent / "metrics.jsonl").read_text()
    older = checkpoint_files.checkpoint_dir(str(parent), 0)
    Trainer(tiny_config(tiny_sd3_dir, tmp_path, num_epochs=2, save_freq=1, resume_from=older, **FAST)).train()
    branch = tmp_path / "test-from-epoch_00000"
    assert [json.loads(line)["epoch"] for line in (branch / "metrics.jsonl").read_text().splitlines()] == [0, 1]
    assert json.loads((branch / "config.json").read_text())["parent_checkpoint"] == older
    assert (parent / "metrics.jsonl").read_text() == parent_metrics
    assert [os.path.basename(p) for p in checkpoint_files.list_checkpoints(str(parent))] == ["epoch_00000", "epoch_00001", "epoch_00002"]


def test_resume_refuses_a_checkpoint_whose_unpickling_would_run_code(tiny_sd3_dir, tmp_path) -> None:
    import pickle

    from flow_grpo.run.config_checks import ConfigError

    class RunsCode:
        def __reduce__(self):
            return (os.makedirs, (str(tmp_path / "code-ran"),))

    checkpoint = checkpoint_files.checkpoint_dir(str(tmp_path / "test"), 0)
    os.makedirs(checkpoint)
    with open(os.path.join(checkpoint, checkpoint_files.STATE_FILE), "wb") as f:
        pickle.dump({"epoch": 0, "lora": RunsCode()}, f)
    config = tiny_config(tiny_sd3_dir, tmp_path, num_epochs=2, resume_from=str(tmp_path / "test"), **FAST)
    with pytest.raises(ConfigError, match=r"state\.pt holds objects other than tensors.*refusing"):
        Trainer(config)
    assert not (tmp_path / "code-ran").exists()


def test_nonfinite_eval_scores_are_counted_not_averaged(monkeypatch) -> None:
    from flow_grpo.sampling import evaluation
    from flow_grpo.sampling.generation import ImageJob
    from flow_grpo.rewards.registry import MultiReward

    jobs = [ImageJob(i, 0, f"prompt {i}", seed=i) for i in range(4)]
    monkeypatch.setattr(evaluation, "config_batches", lambda adapter, own, sample, **kw: [(own, torch.zeros(len(own), 3, 8, 8))])
    scores = torch.tensor([1.0, float("nan"), 3.0, float("inf")])
    reward = MultiReward({"flaky": lambda images, prompts, metadata: scores.clone()}, {"flaky": 1.0})
    result = evaluation.evaluate(None, reward, jobs, ml_collections.ConfigDict())
    assert result.means["flaky"] == 2.0 and result.means["avg"] == 2.0
    assert result.nonfinite == {"flaky": 2, "avg": 2} and result.count == 4
