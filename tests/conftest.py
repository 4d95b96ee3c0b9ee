"""Shared fixtures: the network is blocked for every test, and tiny pipelines are saved once."""

from __future__ import annotations

import logging
import os
import socket

import pytest
import torch
from accelerate import PartialState
from accelerate.state import AcceleratorState

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
# Tiny models run faster on one thread than on two contending ones (and CI has two cores).
torch.set_num_threads(1)
PartialState()  # library code logs through accelerate, which needs its state as in a real run


@pytest.fixture(autouse=True)
def block_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any outbound connection except to this machine's loopback fails the test."""
    original = socket.socket.connect

    def guarded(self: socket.socket, address, *args, **kwargs):
        host = address[0] if isinstance(address, tuple) else address
        if isinstance(host, str) and (host.startswith("127.") or host in ("localhost", "::1") or self.family == socket.AF_UNIX):
            return original(self, address, *args, **kwargs)
        raise RuntimeError(f"network access blocked in tests: {address!r}")

    monkeypatch.setattr(socket.socket, "connect", guarded)


@pytest.fixture(autouse=True)
def root_logging():
    """Drop the stderr handlers a test's command added to the root logger, and put its level back.

    A command's `main` configures logging for its process (`logging.basicConfig`, a handler on the
    stderr of that moment); in the test process that stderr is a capture closed after the test, and
    a later test must not log into it. pytest's own capture handlers (subclasses) are left alone.
    """
    level, before = logging.root.level, set(logging.root.handlers)
    yield
    for handler in logging.root.handlers[:]:
        if type(handler) is logging.StreamHandler and handler not in before:
            logging.root.removeHandler(handler)
    logging.root.setLevel(level)


@pytest.fixture(autouse=True)
def float32_accelerator_state():
    """After a test that set up accelerate in fp16/bf16 (the benchmark does), drop that process-wide state.

    accelerate keeps one state per process and refuses an Accelerator of another precision; a real
    run and a benchmark each own their process, the test suite shares one.
    """
    yield
    shared = AcceleratorState._shared_state
    if shared and shared.get("_mixed_precision") not in (None, "no"):
        AcceleratorState._reset_state()


@pytest.fixture(scope="session")
def tiny_sd3_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny SD3 pipeline (minimal geometry) saved to disk, loaded by tests through from_pretrained."""
    from flow_grpo.testing import save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny-sd3"), "sd3", "minimal")


@pytest.fixture(scope="session")
def tiny_sd3_real_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny SD3 pipeline with the real latent geometry (16 channels, VAE factor 8, patch 2)."""
    from flow_grpo.testing import save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny-sd3-real"), "sd3", "real")
