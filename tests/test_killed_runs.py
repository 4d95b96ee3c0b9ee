"""A run killed (kill -9) at the worst moments keeps one metrics line per published checkpoint."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from flow_grpo.run import checkpoint_files
from flow_grpo.training.trainer import Trainer
from tests.test_trainer import tiny_config

FAST = {"sample.prompts_per_epoch": 2, "save_freq": 1, "keep_checkpoints": 1}


class Killed(BaseException):
    """Stands in for SIGKILL: nothing after the raise runs, no `except Exception` catches it."""


def _epochs(run_dir: str) -> list[int]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line)["epoch"] for line in f]


@pytest.mark.parametrize("moment", ["after_publishing", "while_pruning"])
def test_a_kill_after_publishing_a_checkpoint_loses_no_metrics_line(tiny_sd3_dir, tmp_path, monkeypatch, moment) -> None:
    real_publish, real_rmtree = checkpoint_files.publish, shutil.rmtree

    def publish_then_die(target: str, keep: int) -> None:
        if target.endswith("epoch_00001"):
            os.replace(checkpoint_files.temporary_dir(target), target)
            raise Killed
        real_publish(target, keep)

    def prune_and_die(path, *args, **kwargs):
        if os.path.basename(str(path)).startswith("epoch_00000"):
            raise Killed
        real_rmtree(path, *args, **kwargs)

    if moment == "after_publishing":
        monkeypatch.setattr(checkpoint_files, "publish", publish_then_die)
    else:
        monkeypatch.setattr(checkpoint_files.shutil, "rmtree", prune_and_die)
    with pytest.raises(Killed):
        Trainer(tiny_config(tiny_sd3_dir, tmp_path, num_epochs=3, **FAST)).train()
    monkeypatch.undo()

    run_dir = str(tmp_path / "test")
    assert checkpoint_files.list_checkpoints(run_dir)[-1].endswith("epoch_00001")
    resumed = Trainer(tiny_config(tiny_sd3_dir, tmp_path, num_epochs=3, resume_from=run_dir, **FAST))
    assert resumed.start_epoch == 2
    resumed.train()
    assert _epochs(run_dir) == [0, 1, 2]


@pytest.mark.parametrize("replacing", [True, False], ids=["replacing_the_same_epoch", "pruning"])
def test_a_kill_while_deleting_a_checkpoint_leaves_no_half_deleted_one_under_its_name(tmp_path, monkeypatch, replacing) -> None:
    run_dir = str(tmp_path / "run")
    files = ("state.pt", "rng_0.pt", "pytorch_lora_weights.safetensors")

    def write(epoch: int, content: str) -> str:
        target = checkpoint_files.checkpoint_dir(run_dir, epoch)
        os.makedirs(checkpoint_files.temporary_dir(target))
        for name in files:
            with open(os.path.join(checkpoint_files.temporary_dir(target), name), "w") as f:
                f.write(content)
        return target

    checkpoint_files.publish(write(0, "old"), keep=0)
    checkpoint_files.publish(write(1, "old"), keep=0)

    def delete_one_file_and_die(path, *args, **kwargs):
        os.remove(os.path.join(path, "pytorch_lora_weights.safetensors"))
        raise Killed

    monkeypatch.setattr(checkpoint_files.shutil, "rmtree", delete_one_file_and_die)
    with pytest.raises(Killed):
        checkpoint_files.publish(write(1, "new"), keep=0) if replacing else checkpoint_files.publish(write(2, "new"), keep=2)
    monkeypatch.undo()
    # Every directory under a checkpoint's name is whole; what was being deleted sits under another name.
    for path in checkpoint_files.list_checkpoints(run_dir):
        assert sorted(os.listdir(path)) == sorted(files), path
    newest = checkpoint_files.list_checkpoints(run_dir)[-1]
    with open(os.path.join(newest, "state.pt")) as f:
        assert f.read() == "new"
