"""Run directories and resume rules, decided before any model loads (no model needed here)."""

from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
from pathlib import Path

import pytest
import torch

from flow_grpo.run import checkpoint_files, directory
from flow_grpo.run.config_checks import ConfigError
from flow_grpo.run.directory import cut_metrics, metrics_line, plan_run, prepare
from tests.test_trainer import tiny_config


class _RunsCode:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def _config(logdir: Path, **changes):
    return tiny_config("unused-model", logdir, **{"num_epochs": 10, **changes})


def _state(epoch: int) -> dict:
    """The smallest state.pt with the structure the trainer writes."""
    return {"epoch": epoch, "optimizer_updates": 0, "lora": {"w": torch.ones(2)}, "optimizer": {}}


def _make_run(logdir: Path, name: str, epochs: list[int], **changes) -> str:
    """A run directory as the trainer leaves it: config.json, metrics for 0..max(epochs), checkpoints."""
    config = _config(logdir, run_name=name, **changes)
    plan = plan_run(config, name)
    prepare(plan, config)
    for epoch in epochs:
        path = checkpoint_files.checkpoint_dir(plan.run_dir, epoch)
        os.makedirs(path)
        checkpoint_files.save_file(_state(epoch), os.path.join(path, checkpoint_files.STATE_FILE))
    with open(os.path.join(plan.run_dir, directory.METRICS_FILE), "w") as f:
        f.writelines(metrics_line({"epoch": epoch, "reward/avg": 0.1 * epoch}) for epoch in range(max(epochs) + 1))
    return plan.run_dir


def _digest(directory: str) -> dict[str, str]:
    return {
        os.path.relpath(os.path.join(root, name), directory): hashlib.sha256(Path(root, name).read_bytes()).hexdigest()
        for root, _, names in os.walk(directory)
        for name in names
    }


def _epochs(path: str) -> list[int]:
    with open(path) as f:
        return [json.loads(line)["epoch"] for line in f]


def test_starting_a_run_where_one_exists_fails_and_says_how_to_resume(tmp_path) -> None:
    existing = _make_run(tmp_path, "test", [0])
    with pytest.raises(ConfigError, match=rf"{existing} already holds a run.*resume_from={existing}.*another --config.run_name"):
        plan_run(_config(tmp_path), "test")


def test_resume_from_an_older_checkpoint_branches_and_leaves_the_parent_untouched(tmp_path) -> None:
    parent = _make_run(tmp_path, "test", [0, 1, 2])
    before = _digest(parent)
    older = checkpoint_files.checkpoint_dir(parent, 1)
    config = _config(tmp_path, resume_from=older)
    plan = plan_run(config, "test")
    assert not plan.continues and plan.run_dir == str(tmp_path / "test-from-epoch_00001") and plan.epoch == 1
    prepare(plan, config)
    recorded = json.loads(Path(plan.run_dir, "config.json").read_text())
    assert recorded["parent_checkpoint"] == older and recorded["run_name"] == "test-from-epoch_00001"
    assert _epochs(os.path.join(plan.run_dir, "metrics.jsonl")) == [0, 1]
    assert _digest(parent) == before
    # A second branch from the same checkpoint gets its own directory.
    assert plan_run(config, "test").run_dir == str(tmp_path / "test-from-epoch_00001-2")


def test_resume_overwrite_continues_in_place_and_sets_later_records_aside(tmp_path) -> None:
    parent = _make_run(tmp_path, "test", [0, 1, 2])
    config = _config(tmp_path, resume_from=checkpoint_files.checkpoint_dir(parent, 0), resume_overwrite=True)
    plan = plan_run(config, "test")
    assert plan.continues and plan.run_dir == parent and plan.epoch == 0
    prepare(plan, config)
    assert [os.path.basename(p) for p in checkpoint_files.list_checkpoints(parent)] == ["epoch_00000"]
    assert sorted(os.listdir(os.path.join(parent, "checkpoints"))) == ["epoch_00000", "epoch_00001.orphaned", "epoch_00002.orphaned"]
    assert _epochs(os.path.join(parent, "metrics.jsonl")) == [0]
    assert _epochs(os.path.join(parent, "metrics.jsonl.orphaned")) == [1, 2]


def test_resume_latest_continues_the_newest_run_and_records_overrides(tmp_path) -> None:
    _make_run(tmp_path, "older", [0])
    newest = _make_run(tmp_path, "newer", [0, 1])
    Path(newest, "metrics.jsonl").write_text("".join(metrics_line({"epoch": e}) for e in range(4)))  # epochs 2, 3 not saved
    config_before = Path(newest, "config.json").read_text()
    config = tiny_config("unused-model", tmp_path, num_epochs=10, resume_from="latest", **{"train.learning_rate": 1e-3})
    config.run_name = ""
    plan = plan_run(config, "ignored")
    assert plan.continues and plan.run_dir == newest and plan.epoch == 1
    assert plan.overrides == {"train.learning_rate": {"was": 3e-2, "now": 1e-3}}
    prepare(plan, config)
    assert Path(newest, "config.json").read_text() == config_before  # the original config stays
    assert _epochs(os.path.join(newest, "metrics.jsonl")) == [0, 1]  # no duplicate epochs after resuming
    assert _epochs(os.path.join(newest, "metrics.jsonl.orphaned")) == [2, 3]
    resumes = [json.loads(line) for line in Path(newest, "resumes.jsonl").read_text().splitlines()]
    assert resumes[0]["epoch"] == 1 and resumes[0]["overrides"] == {"train.learning_rate": {"was": 3e-2, "now": 1e-3}}


@pytest.mark.parametrize(
    "key,value",
    [("train.lora_rank", 4), ("train.lora_alpha", 64), ("sample.group_size", 2), ("algorithm", "flow_grpo")],
)
def test_a_resume_that_changes_a_fixed_key_is_refused_naming_it(tmp_path, key, value) -> None:
    run = _make_run(tmp_path, "test", [0])
    config = _config(tmp_path, resume_from=run, **{key: value})
    with pytest.raises(ConfigError, match=rf"config\.{key} is {value!r} but the run being resumed .* was trained with"):
        plan_run(config, "test")


def test_resuming_a_finished_run_says_so(tmp_path) -> None:
    run = _make_run(tmp_path, "test", [0, 1])
    config = _config(tmp_path, resume_from=run, num_epochs=2)
    with pytest.raises(ConfigError, match=rf"run {run} already finished 2 epochs.*raise num_epochs above 2"):
        plan_run(config, "test")


def test_a_code_carrying_checkpoint_is_refused_and_an_older_one_is_used(tmp_path) -> None:
    run = _make_run(tmp_path, "test", [0, 1])
    marker = tmp_path / "code-ran"
    planted = os.path.join(checkpoint_files.checkpoint_dir(run, 1), checkpoint_files.STATE_FILE)
    with open(planted, "wb") as f:
        pickle.dump({"epoch": 1, "payload": _RunsCode(str(marker))}, f)
    plan = plan_run(_config(tmp_path, resume_from=run), "test")  # falls back, with a warning
    assert plan.continues and plan.epoch == 0
    with pytest.raises(ConfigError, match=rf"{planted} holds objects other than tensors.*refusing"):
        plan_run(_config(tmp_path, resume_from=checkpoint_files.checkpoint_dir(run, 1)), "test")
    os.remove(os.path.join(checkpoint_files.checkpoint_dir(run, 0), checkpoint_files.STATE_FILE))
    with pytest.raises(ConfigError, match="no loadable checkpoint.*refusing"):
        plan_run(_config(tmp_path, resume_from=run), "test")
    assert not marker.exists()


def test_metrics_lines_are_strict_json_with_nonfinite_values_flagged() -> None:
    line = metrics_line({"epoch": 3, "reward/avg": float("nan"), "train/kl": float("inf"), "eval/avg": 0.5})
    row = json.loads(line, parse_constant=lambda token: pytest.fail(f"non-JSON token {token}"))
    assert row == {"epoch": 3, "reward/avg": None, "train/kl": None, "eval/avg": 0.5, "nonfinite": ["reward/avg", "train/kl"]}
    assert math.isfinite(json.loads(metrics_line({"epoch": 0, "x": 1.0}))["x"])


def test_cut_metrics_keeps_unparsable_lines_aside(tmp_path) -> None:
    Path(tmp_path, "metrics.jsonl").write_text('{"epoch": 0}\n{"epoch": 1}\n{"epoch": 2, "x": NaN}\nnot json\n')
    assert cut_metrics(str(tmp_path), 0) == 3
    assert Path(tmp_path, "metrics.jsonl").read_text() == '{"epoch": 0}\n'


def test_default_run_name_is_the_main_process_name(tmp_path, monkeypatch) -> None:
    def from_main(objects, from_process=0):
        objects[0] = "run-from-main"
        return objects

    monkeypatch.setattr(directory, "broadcast_object_list", from_main)
    assert directory.default_run_name(str(tmp_path)) == "run-from-main"
    monkeypatch.undo()
    name = directory.default_run_name(str(tmp_path))
    os.makedirs(tmp_path / name)
    assert directory.default_run_name(str(tmp_path)) != name  # never an existing directory


@pytest.mark.parametrize("name", ["../../escaped", "/abs/run", ".", "..", "a/b"])
def test_a_run_name_that_leaves_logdir_is_refused_before_writing(tmp_path, name) -> None:
    logdir = tmp_path / "logs"
    with pytest.raises(ConfigError, match=r"config\.run_name: .* is not a single directory name"):
        plan_run(_config(logdir, run_name=name), name)
    assert list(tmp_path.iterdir()) == []


def test_resume_overwrite_twice_from_the_same_checkpoint_gives_unique_set_aside_names(tmp_path) -> None:
    parent = _make_run(tmp_path, "test", [0, 1, 2])
    config = _config(tmp_path, resume_from=checkpoint_files.checkpoint_dir(parent, 0), resume_overwrite=True)
    prepare(plan_run(config, "test"), config)
    for epoch in (1, 2):  # the resumed run writes its own epochs 1 and 2 again
        path = checkpoint_files.checkpoint_dir(parent, epoch)
        os.makedirs(path)
        checkpoint_files.save_file(_state(epoch), os.path.join(path, checkpoint_files.STATE_FILE))
    prepare(plan_run(config, "test"), config)
    assert sorted(os.listdir(os.path.join(parent, "checkpoints"))) == [
        "epoch_00000", "epoch_00001.orphaned", "epoch_00001.orphaned-2", "epoch_00002.orphaned", "epoch_00002.orphaned-2",
    ]


def test_a_launch_that_failed_before_its_first_epoch_does_not_block_the_same_command(tmp_path) -> None:
    config = _config(tmp_path, run_name="test")
    prepare(plan_run(config, "test"), config)  # config.json written, then the launch failed (e.g. a bad prompt file)
    os.makedirs(tmp_path / "test" / "checkpoints")
    (tmp_path / "test" / "metrics.jsonl").write_text("")
    plan = plan_run(config, "test")  # the same command, once fixed, simply starts
    assert plan.checkpoint is None and plan.run_dir == str(tmp_path / "test")
    prepare(plan, config)
    assert json.loads((tmp_path / "test" / "config.json").read_text())["run_name"] == "test"


def test_files_the_trainer_writes_are_never_written_through_a_symlink(tmp_path) -> None:
    from flow_grpo.run.directory import append_metrics, wandb_id
    from flow_grpo.run.files import SymlinkRefusedError

    outside = tmp_path / "outside.txt"
    outside.write_text("precious\n")
    run_dir = tmp_path / "logs" / "test"
    run_dir.mkdir(parents=True)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    (run_dir / "metrics.jsonl").symlink_to(empty)  # no metrics line: not yet a run
    for name in ("wandb_id.txt", "config.json"):
        (run_dir / name).symlink_to(outside)
    config = _config(tmp_path / "logs")
    plan = plan_run(config, "test")
    with pytest.raises(SymlinkRefusedError, match=r"config\.json is a symbolic link"):
        prepare(plan, config)
    with pytest.raises(SymlinkRefusedError, match=r"metrics\.jsonl is a symbolic link"):
        append_metrics(str(run_dir), {"epoch": 0})
    with pytest.raises(SymlinkRefusedError, match=r"wandb_id\.txt is a symbolic link"):
        wandb_id(plan)
    assert outside.read_text() == "precious\n" and empty.read_text() == ""


def test_pruning_never_follows_a_symlinked_checkpoint(tmp_path) -> None:
    run_dir = _make_run(tmp_path, "test", [1, 2])
    elsewhere = tmp_path / "elsewhere" / "epoch_00000"
    elsewhere.mkdir(parents=True)
    checkpoint_files.save_file(_state(0), str(elsewhere / checkpoint_files.STATE_FILE))
    link = checkpoint_files.checkpoint_dir(run_dir, 0)
    os.symlink(elsewhere, link)
    checkpoint_files.prune(run_dir, keep=1)
    assert (elsewhere / checkpoint_files.STATE_FILE).is_file()  # the target is untouched
    assert not os.path.lexists(link)
    assert [os.path.basename(p) for p in checkpoint_files.list_checkpoints(run_dir)] == ["epoch_00002"]
