"""The heartbeat that ends a multi-process job when one process stops answering (in one process, on a real TCPStore)."""

from __future__ import annotations

import datetime
import json
import signal
import subprocess
import threading
import time

import pytest
import torch.distributed as dist

from flow_grpo.training import heartbeat
from flow_grpo.training.heartbeat import Heartbeat, collective_timeout, detection_bound, heartbeat_interval

TIMEOUT_S = 0.6


class Ended:
    """Records the `end` call of a heartbeat instead of ending the test process."""

    def __init__(self) -> None:
        self.messages: list[str] = []
        self.at: float | None = None
        self.event = threading.Event()

    def __call__(self, message: str) -> None:
        self.messages.append(message)
        self.at = time.monotonic()
        self.event.set()


@pytest.fixture
def server():
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=datetime.timedelta(seconds=5))
    yield store
    del store


def _client(server: dist.TCPStore, timeout_s: float = TIMEOUT_S) -> dist.TCPStore:
    return dist.TCPStore("127.0.0.1", server.port, is_master=False, wait_for_workers=False, timeout=datetime.timedelta(seconds=timeout_s))


@pytest.fixture
def stopped_process():
    """A child process stopped with SIGSTOP, as a frozen rank would be."""
    child = subprocess.Popen(["sleep", "60"])
    child.send_signal(signal.SIGSTOP)
    yield child
    if child.poll() is None:
        child.kill()
    child.wait()


def test_interval_bound_and_collective_timeout_follow_the_timeout() -> None:
    assert heartbeat_interval(10) == 1.0 and heartbeat_interval(1800) == 10.0  # T / 10, at most 10 s
    assert detection_bound(10) == 12.0 and detection_bound(1800) == 1820.0
    # The collectives wait longer than the heartbeat needs, so the heartbeat names the rank first.
    assert collective_timeout(1800).total_seconds() == 1830.0
    assert all(collective_timeout(t).total_seconds() > detection_bound(t) for t in (0.5, 10, 30, 1800))


def test_a_silent_peer_is_named_and_killed_within_the_bound(server, stopped_process) -> None:
    ended = Ended()
    # Rank 1 registered (the stopped child stands for it) and beat once, then never again.
    peer = Heartbeat(_client(server), 1, 2, TIMEOUT_S, "job/")
    peer.store.set(peer.key("who", 1), json.dumps(heartbeat.process_identity(stopped_process.pid)))
    peer.store.add(peer.key("beat", 1), 1)
    watcher = Heartbeat(_client(server), 0, 2, TIMEOUT_S, "job/", end=ended)
    started = time.monotonic()
    watcher.start()
    assert ended.event.wait(5)
    assert TIMEOUT_S <= ended.at - started <= detection_bound(TIMEOUT_S) + 2
    time.sleep(2 * TIMEOUT_S)  # the other thread does not end the process a second time
    (message,) = ended.messages
    assert message.startswith(f"rank 1 (pid {stopped_process.pid} on ")
    assert "stopped answering" in message and "killed rank 1 (on this machine)" in message
    assert "config.distributed_timeout_s=0.6" in message and "rank 0 ends itself" in message
    assert stopped_process.wait(5) == -signal.SIGKILL


def test_beating_and_finished_peers_are_not_taken_for_stopped(server) -> None:
    ended = Ended()
    timeout_s = 1.0  # longer than a thread of a loaded machine waits to be scheduled
    beats = [Heartbeat(_client(server, timeout_s), rank, 3, timeout_s, "job/", end=ended) for rank in range(3)]
    for beat in beats:
        beat.start()
    time.sleep(2 * timeout_s)
    beats[2].stop()  # finished: marks itself done and stops beating
    time.sleep(2 * timeout_s)
    assert ended.messages == []
    for beat in beats[:2]:
        beat.stop()
    assert server.check(["job/done/0", "job/done/1", "job/done/2"])


def test_a_peer_that_never_registered_is_named(server) -> None:
    ended = Ended()
    watcher = Heartbeat(_client(server), 0, 2, TIMEOUT_S, "job/", end=ended)
    watcher.start()
    assert ended.event.wait(5)
    assert ended.messages[0].startswith("rank 1 (never registered) stopped answering")


def test_a_store_that_is_gone_ends_the_process() -> None:
    ended = Ended()
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=datetime.timedelta(seconds=5))
    client = _client(store)
    watcher = Heartbeat(client, 0, 2, TIMEOUT_S, "job/", address="127.0.0.1:1", end=ended)
    watcher.start()
    del store  # the launcher that served the store is gone: every request fails at once
    assert ended.event.wait(5)
    assert ended.messages[0].startswith("the job's store at 127.0.0.1:1 has not answered for")


class FrozenStore:
    """A store whose host stops after the start: every later request waits for good, as TCPStore's do."""

    def __init__(self) -> None:
        self.frozen, self.thawed = threading.Event(), threading.Event()
        self.values: dict[str, int] = {}

    def set(self, key: str, value: str) -> None:
        pass

    def add(self, key: str, amount: int) -> int:
        if self.frozen.is_set():
            self.thawed.wait()
        self.values[key] = self.values.get(key, 0) + amount
        return self.values[key]

    def multi_get(self, keys: list[str]) -> list[bytes]:
        return [str(self.values[key]).encode() for key in keys]

    def check(self, keys: list[str]) -> bool:
        return all(key in self.values for key in keys)


def test_a_store_that_stops_answering_ends_the_process() -> None:
    ended = Ended()
    watcher = Heartbeat(FrozenStore(), 0, 2, TIMEOUT_S, "job/", end=ended)
    watcher.start()
    watcher.store.frozen.set()
    started = time.monotonic()
    assert ended.event.wait(5)
    assert ended.at - started <= TIMEOUT_S + 2 * heartbeat_interval(TIMEOUT_S) + 2
    assert ended.messages == [ended.messages[0]] and "has not answered for" in ended.messages[0]
    watcher.store.thawed.set()  # let the blocked request return, so no thread outlives the test


def test_only_the_process_an_identity_describes_is_killed(stopped_process) -> None:
    identity = heartbeat.process_identity(stopped_process.pid)
    assert identity["start"] is not None
    # The same pid started at another time (a reused pid), or another machine: left alone.
    assert not heartbeat.kill_if_same_process({**identity, "start": identity["start"] + 1})
    assert not heartbeat.kill_if_same_process({**identity, "boot": "another-machine"})
    assert not heartbeat.kill_if_same_process({**identity, "pid_namespace": -1})
    assert stopped_process.poll() is None
    assert heartbeat.kill_if_same_process(identity)
    assert stopped_process.wait(5) == -signal.SIGKILL


def test_ending_waits_for_a_checkpoint_being_published(monkeypatch) -> None:
    exits: list[tuple[int, float]] = []
    monkeypatch.setattr(heartbeat.os, "_exit", lambda code: exits.append((code, time.monotonic())))
    monkeypatch.setattr(heartbeat, "_UNINTERRUPTED", threading.Lock())
    released = []
    with heartbeat.uninterrupted():
        ender = threading.Thread(target=heartbeat.end_process, args=("rank 1 stopped answering", 5.0))
        ender.start()
        time.sleep(0.3)
        assert exits == []  # still publishing: the process is not ended
        released.append(time.monotonic())
    ender.join(5)
    assert exits and exits[0][0] == heartbeat.EXIT_CODE and exits[0][1] >= released[0]


def test_the_timeout_is_checked_before_the_process_group_starts(monkeypatch) -> None:
    # Checked in the Trainer only, a timeout of 0 would already have started the group (with 10 s of margin).
    from config import grpo as presets
    from flow_grpo.run.config_checks import ConfigError
    from flow_grpo.training import trainer

    config = presets.tiny_tp_grpo()
    config.distributed_timeout_s = 0
    monkeypatch.setattr(trainer, "PartialState", lambda **kwargs: pytest.fail("the process group started"))
    with pytest.raises(ConfigError, match=r"config\.distributed_timeout_s: 0 is outside \(0, 604800\]"):
        trainer.process_state(config)
