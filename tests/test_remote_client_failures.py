"""The reward client when things go wrong: a frozen server mid-epoch, oversized numbers, no Accelerator,
and the server command on a port already in use.

Loopback only; every wait is bounded.
"""

from __future__ import annotations

import logging
import socket
import time

import pytest
import torch
from accelerate.logging import get_logger as accelerate_logger
from accelerate.state import PartialState

from flow_grpo.reward_server.server import RewardServer
from flow_grpo.rewards import AsyncScorer, MultiReward, RemoteReward, RemoteRewardBadReplyError
from flow_grpo.rewards.remote import RemoteRewardTimeoutError
from tests.test_remote_reward import CannedServer, _answer


def _batch(num: int = 2) -> tuple[torch.Tensor, list[str], list[dict]]:
    images = torch.rand(num, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    return images, ["a"] * num, [{}] * num


# ---- a reward server that freezes mid-epoch costs one bound, not one per request ----


@pytest.fixture
def frozen_url():
    """A port that completes connections and reads nothing: a server frozen mid-epoch (e.g. SIGSTOP)."""
    with socket.create_server(("127.0.0.1", 0), backlog=16) as listener:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"


def test_the_first_request_past_its_bound_ends_the_scoring_of_the_epoch(frozen_url):
    bound_s = 1.0
    client = RemoteReward(frozen_url, "s", timeout=bound_s, max_retries=0)
    reward = MultiReward({"remote": client}, {"remote": 1.0})
    start = time.monotonic()
    with pytest.raises(RemoteRewardTimeoutError):
        with AsyncScorer(reward) as scorer:  # as sample_epoch scores an epoch's batches
            pending = [scorer.submit(*_batch()) for _ in range(5)]
            [future.result() for future in pending]
    elapsed = time.monotonic() - start
    assert elapsed < bound_s + 0.8, f"waited {elapsed:.1f}s: one bound per queued request"
    assert all(future.cancelled() for future in pending[1:])


def test_a_batch_submitted_after_a_failure_raises_it_at_once(frozen_url):
    client = RemoteReward(frozen_url, "s", timeout=0.3, max_retries=0)
    with AsyncScorer(MultiReward({"remote": client}, {"remote": 1.0})) as scorer:
        first = scorer.submit(*_batch())
        assert isinstance(first.exception(timeout=10), RemoteRewardTimeoutError)
        start = time.monotonic()
        with pytest.raises(RemoteRewardTimeoutError):
            scorer.submit(*_batch())  # the epoch's sampling stops here instead of sampling on
        assert time.monotonic() - start < 0.1


# ---- a score that does not fit a float is a bad reply ----


def test_a_score_too_large_for_a_float_is_a_bad_reply():
    huge = "1" + "0" * 400  # a valid JSON integer of 401 digits; float() of it raises OverflowError
    replies = [
        (("s", ()), f'{{"scores": [{huge}, 0.5]}}'),
        (("s", ("strict",)), f'{{"scores": [0.5, 0.5], "details": {{"strict": [null, {huge}]}}}}'),
    ]
    for (scorer, details), body in replies:
        with CannedServer(_answer(200, body.encode())) as canned:
            client = RemoteReward(canned.url, scorer, timeout=5.0, max_retries=0, detail_names=details)
            with pytest.raises(RemoteRewardBadReplyError, match="finite"):
                client(*_batch())


# ---- used as a library, without an Accelerator ----


def test_client_and_server_log_without_an_accelerator(monkeypatch, caplog):
    monkeypatch.setattr(PartialState, "_shared_state", {})
    with pytest.raises(RuntimeError, match="initialize the accelerate state"):
        accelerate_logger("check").warning("accelerate's own logger refuses to log here")
    answers = iter([(503, b'{"error": "busy"}'), (200, b'{"scores": [0.25, 0.75]}')])

    def respond(handler) -> None:
        _answer(*next(answers))(handler)

    with caplog.at_level(logging.DEBUG):
        with CannedServer(respond) as canned:
            client = RemoteReward(canned.url, "s", timeout=5.0, max_retries=1, backoff=0.01)
            torch.testing.assert_close(client(*_batch()), torch.tensor([0.25, 0.75]))
        assert any("retry 1/1" in record.getMessage() for record in caplog.records)

        with RewardServer({"s": lambda images, prompts, metadata: images.mean(dim=(1, 2, 3))}) as server:
            client = RemoteReward(server.url, "s", timeout=5.0, max_retries=0)
            images, prompts, metadata = _batch()
            assert client(images, prompts, metadata).shape == (2,)
        assert any("POST /score" in record.getMessage() for record in caplog.records)


# ---- the server command on a port already in use ----


def test_the_reward_server_on_a_port_in_use_is_a_one_line_error(monkeypatch, capsys):
    from flow_grpo.commands import reward_server as command
    from flow_grpo.reward_server import server as server_module

    def must_not_load(*args, **kwargs):
        raise AssertionError("the scorers were built before the port was checked")

    monkeypatch.setattr(server_module, "build_replicas", must_not_load)
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        with pytest.raises(SystemExit) as exit_info:
            command.main(["--scorers", "jpeg_compressibility", "--port", str(port), "--device", "cpu"])
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: ") and f"port {port} on 127.0.0.1 is already in use; " in lines[0]
    assert "--port" in lines[0]
