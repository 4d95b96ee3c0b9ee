"""Checkpoint files are data, not code; broken files give errors that name them."""

from __future__ import annotations

import errno
import os
import pickle
import random

import numpy as np
import pytest
import torch

from flow_grpo.run import checkpoint_files
from flow_grpo.run.checkpoint_files import CheckpointError


class _RunsCode:
    """Unpickling this object would create a marker file (a stand-in for arbitrary code)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def _checkpoint(run_dir, epoch: int, state: dict | None = None) -> str:
    path = checkpoint_files.checkpoint_dir(str(run_dir), epoch)
    os.makedirs(path)
    checkpoint_files.save_file(state if state is not None else {"epoch": epoch, "optimizer_updates": 0, "lora": {}, "optimizer": {}}, os.path.join(path, checkpoint_files.STATE_FILE))
    return path


def test_rng_state_round_trips_through_a_weights_only_file(tmp_path):
    random.random(), np.random.rand(), torch.rand(1)
    path = str(tmp_path / "rng.pt")
    checkpoint_files.save_file(checkpoint_files.rng_state(), path)
    expected = (random.random(), float(np.random.rand()), torch.rand(3))
    checkpoint_files.set_rng_state(torch.load(path, weights_only=True))
    got = (random.random(), float(np.random.rand()), torch.rand(3))
    assert expected[:2] == got[:2]
    torch.testing.assert_close(expected[2], got[2])


def test_a_file_whose_unpickling_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "code-ran"
    path = tmp_path / "state.pt"
    with open(path, "wb") as f:
        pickle.dump({"epoch": 3, "payload": _RunsCode(str(marker))}, f)
    with pytest.raises(CheckpointError, match="refusing to load") as caught:
        checkpoint_files.load_file(str(path))
    assert str(path) in str(caught.value)
    assert not marker.exists()


@pytest.mark.parametrize("content", [b"", b"garbage that is not a checkpoint", None], ids=["empty", "garbage", "truncated"])
def test_empty_garbage_and_truncated_files_name_the_file(tmp_path, content):
    path = tmp_path / "state.pt"
    if content is None:
        torch.save({"weights": torch.randn(1000)}, path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    else:
        path.write_bytes(content)
    with pytest.raises(CheckpointError, match="state.pt"):
        checkpoint_files.load_file(str(path))


def test_resume_from_a_run_falls_back_to_the_previous_complete_checkpoint(tmp_path):
    good = _checkpoint(tmp_path, 1)
    broken = _checkpoint(tmp_path, 2)
    with open(os.path.join(broken, checkpoint_files.STATE_FILE), "wb") as f:
        f.write(b"\x00" * 10)
    path, state = checkpoint_files.newest_loadable(str(tmp_path))
    assert path == good and state["epoch"] == 1
    with open(os.path.join(good, checkpoint_files.STATE_FILE), "wb"):
        pass
    with pytest.raises(FileNotFoundError, match="no loadable checkpoint"):
        checkpoint_files.newest_loadable(str(tmp_path))


def test_a_full_disk_says_no_space_left_and_keeps_the_previous_file(tmp_path, monkeypatch):
    path = str(tmp_path / "state.pt")
    checkpoint_files.save_file({"epoch": 1}, path)

    real_open = checkpoint_files.open_to_write
    monkeypatch.setattr(checkpoint_files, "open_to_write", lambda target, mode: real_open("/dev/full", mode) if target.endswith(".part") else real_open(target, mode))
    with pytest.raises(OSError, match="no space left on device while writing .*state.pt"):
        checkpoint_files.save_file({"epoch": 2}, path)
    assert checkpoint_files.load_file(path) == {"epoch": 1}
    assert not os.path.exists(path + ".part")


@pytest.mark.parametrize(
    "state,problem",
    [
        ([1, 2], "it holds list, not a dict"),
        ({"epoch": 0}, "keys .* are missing"),
        ({"epoch": "3", "optimizer_updates": 0, "lora": {}, "optimizer": {}}, "epoch is '3', not a non-negative integer"),
        ({"epoch": 0, "optimizer_updates": 0, "lora": {"w": [1.0]}, "optimizer": {}}, "lora is not a mapping"),
    ],
)
def test_a_state_of_the_wrong_structure_names_the_file_and_the_problem(tmp_path, state, problem):
    path = _checkpoint(tmp_path, 0, state)
    with pytest.raises(CheckpointError, match=rf"{path}/state\.pt is not a training state of this trainer: {problem}"):
        checkpoint_files.load_checkpoint_state(path)
