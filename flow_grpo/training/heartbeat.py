"""Ending a multi-process job when one process stops answering: a heartbeat through the job's store.

A process that is stopped (SIGSTOP, a debugger), stuck in the kernel or cut off with its machine
never reaches the next collective, and the others wait in theirs. Each process of a multi-process
run therefore runs a `Heartbeat` thread: every `heartbeat_interval(T)` seconds it adds 1 to its own
counter in the job's rendezvous store (the TCPStore at `MASTER_ADDR:MASTER_PORT`, served by the
launcher itself under `accelerate launch` / `torchrun`) and reads every other process's counter.
A counter that has not moved for `T = config.distributed_timeout_s` seconds, timed on the reader's
own clock (no two machines' clocks are compared), names a process that stopped answering. The
reader then

1. logs an error naming that rank, its pid and its machine;
2. kills it with SIGKILL when it runs on the same machine (same boot, pid namespace, pid and
   process start time): a stopped process never handles the SIGTERM a launcher sends first, so the
   launcher would otherwise wait its shutdown grace (`TORCH_ELASTIC_SHUTDOWN_TIMEOUT`, 30 s);
3. ends its own process with exit code 1 (`os._exit`: its main thread is blocked inside a
   collective and cannot be interrupted), so the launcher ends the job.

Every other process reaches that verdict within `detection_bound(T) = T + 2 x interval` of the
freeze: the last beat came at most one interval before it, was read at most one interval after
it, and the verdict is taken at the first read after T seconds without a change. Collectives time
out later, after `collective_timeout(T)`, so that the heartbeat, which names the rank and kills a
stopped neighbour, acts first; the collective timeout stays the backstop for a process that still
beats but hangs in its main thread. Training never waits for the heartbeat: it is one thread with
two store requests per interval.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator

import torch.distributed as dist
from accelerate import PartialState
from accelerate.logging import get_logger

__all__ = [
    "Heartbeat",
    "collective_timeout",
    "detection_bound",
    "heartbeat_interval",
    "kill_if_same_process",
    "process_identity",
    "uninterrupted",
    "watching",
]

logger = get_logger(__name__)

MAX_INTERVAL_S = 10.0
"""Beats are `T / 10` apart, at most this many seconds (store traffic stays negligible for long T)."""
COLLECTIVE_MARGIN_S = 10.0
"""How much longer than `detection_bound(T)` a collective may wait before it fails on its own."""
EXIT_CODE = 1

_UNINTERRUPTED = threading.Lock()


def heartbeat_interval(timeout_s: float) -> float:
    """Seconds between two beats of one process: a tenth of the timeout, at most `MAX_INTERVAL_S`."""
    return min(timeout_s / 10, MAX_INTERVAL_S)


def detection_bound(timeout_s: float) -> float:
    """Seconds after a process stops within which every other process has ended itself (see the module doc)."""
    return timeout_s + 2 * heartbeat_interval(timeout_s)


def collective_timeout(timeout_s: float) -> datetime.timedelta:
    """The process group's timeout: later than the heartbeat's verdict, so a stopped process is named first."""
    return datetime.timedelta(seconds=detection_bound(timeout_s) + COLLECTIVE_MARGIN_S)


@contextlib.contextmanager
def uninterrupted() -> Iterator[None]:
    """A block (publishing a checkpoint) that the heartbeat lets finish before it ends the process.

    The heartbeat waits for the block at most `T` seconds; everything else a checkpoint writes
    goes to a temporary directory, so ending the process anywhere else leaves no partial checkpoint.
    """
    with _UNINTERRUPTED:
        yield


def _start_time(pid: int) -> int | None:
    """The start time of process `pid` in clock ticks after boot (`/proc/<pid>/stat` field 22), None if unknown."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            # The command name (field 2) may hold spaces and parentheses: split after its last ')'.
            fields = f.read().rpartition(")")[2].split()
        return int(fields[19])
    except (OSError, ValueError, IndexError):
        return None


def _machine() -> tuple[str | None, int | None]:
    """This machine's boot id and this process's pid namespace: two processes with equal values see the same pids."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            boot = f.read().strip()
        return boot, os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None, None


def process_identity(pid: int | None = None) -> dict[str, object]:
    """What identifies process `pid` (default: this one) across machines: host, boot, pid namespace, pid, start time."""
    pid = os.getpid() if pid is None else pid
    boot, namespace = _machine()
    return {"host": socket.gethostname(), "boot": boot, "pid_namespace": namespace, "pid": pid, "start": _start_time(pid)}


def kill_if_same_process(identity: dict[str, object]) -> bool:
    """SIGKILL the process `identity` describes if it runs on this machine and is still that process.

    Returns whether it was killed. A process on another machine, in another pid namespace, or whose
    pid now belongs to a process started at another time is left alone.
    """
    boot, namespace = _machine()
    pid = identity.get("pid")
    if boot is None or identity.get("boot") != boot or identity.get("pid_namespace") != namespace or not isinstance(pid, int):
        return False
    if identity.get("start") is None or _start_time(pid) != identity["start"]:
        return False
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return False
    return True


def end_process(message: str, wait_s: float) -> None:
    """Log `message`, let a running `uninterrupted` block finish (at most `wait_s`), then exit with `EXIT_CODE`."""
    logger.error(message, main_process_only=False)
    for handler in logging.getLogger().handlers:
        handler.flush()
    sys.stderr.flush()
    # Never released: no checkpoint may start publishing once the process is ending.
    _UNINTERRUPTED.acquire(timeout=wait_s)
    os._exit(EXIT_CODE)


class Heartbeat:
    """One process's beat and its watch over the others' (see the module doc).

    Args:
        store: a client of the job's store, used only by this object's thread.
        rank: this process's rank; world_size: the number of processes.
        timeout_s: `config.distributed_timeout_s`.
        prefix: the store keys' prefix, unique to this launch.
        address: where the store is (`host:port`), for messages.
        end: called with the message when a process stopped answering (default: `end_process`,
            which waits at most `timeout_s` for a checkpoint being published).
    """

    def __init__(
        self,
        store: dist.Store,
        rank: int,
        world_size: int,
        timeout_s: float,
        prefix: str,
        address: str = "MASTER_ADDR:MASTER_PORT",
        end: Callable[[str], None] | None = None,
    ) -> None:
        self.store, self.rank, self.timeout_s, self.prefix, self.address = store, rank, timeout_s, prefix, address
        self.end = end or (lambda message: end_process(message, timeout_s))
        self.peers = [r for r in range(world_size) if r != rank]
        self.interval = heartbeat_interval(timeout_s)
        self._answered = time.monotonic()  # when the store last answered this process
        self._stopping = threading.Event()
        self._ending = threading.Lock()  # taken by the one thread that ends the process
        self._threads = [
            threading.Thread(target=self._beat, name="flow-grpo-heartbeat", daemon=True),
            # A store whose host stopped leaves a request unanswered for good (TCPStore has no
            # timeout on it), so a second thread times the store's silence.
            threading.Thread(target=self._guard, name="flow-grpo-heartbeat-guard", daemon=True),
        ]

    def key(self, kind: str, rank: int) -> str:
        """The store key of `kind` ("beat", "who" or "done") for `rank`."""
        return f"{self.prefix}{kind}/{rank}"

    def start(self) -> None:
        """Publish this process's identity and first beat, then beat and watch in threads."""
        self.store.set(self.key("who", self.rank), json.dumps(process_identity()))
        self.store.add(self.key("beat", self.rank), 1)
        for rank in self.peers:  # create the counters of peers that have not beaten yet: reads never wait
            self.store.add(self.key("beat", rank), 0)
        self._answered = time.monotonic()
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        """Stop beating and mark this process as finished, so the others do not take it for stopped."""
        self._stopping.set()
        for thread in self._threads:
            thread.join(timeout=2 * self.interval + 1)

    def _beat(self) -> None:
        keys = [self.key("beat", r) for r in self.peers]
        counters: list[bytes | None] = [None] * len(self.peers)
        silent = [0.0] * len(self.peers)  # seconds each peer's counter has not moved, as observed here
        previous = time.monotonic()
        refused = False  # the newest store request failed
        while not self._stopping.wait(self.interval):
            try:
                stale = self._beat_and_read(keys, counters, silent, min(time.monotonic() - previous, 2 * self.interval))
            except dist.DistError:  # the store refused: `_guard` ends the process if that lasts
                refused = True
                continue
            refused = False
            previous = self._answered = time.monotonic()
            if stale:
                self._finish(self._stopped_message(stale))
                return
        if refused:  # a store already gone needs no mark (and writing to it makes torch log a broken pipe)
            return
        with contextlib.suppress(dist.DistError):
            self.store.set(self.key("done", self.rank), "1")  # sent without waiting for an answer

    def _guard(self) -> None:
        while not self._stopping.wait(self.interval):
            silence = time.monotonic() - self._answered
            if silence >= self.timeout_s:
                self._finish(self._store_lost_message(silence))
                return

    def _finish(self, message: str) -> None:
        """Stop both threads and call `end` once, whichever thread comes first."""
        if self._ending.acquire(blocking=False):
            self._stopping.set()
            self.end(message)

    def _beat_and_read(
        self, keys: list[str], counters: list[bytes | None], silent: list[float], elapsed: float
    ) -> list[tuple[int, float]]:
        """Beat once, read the peers' counters and return the (rank, seconds silent) of those silent for T.

        `elapsed` is the time since the last read, capped: a gap this thread itself did not observe
        (it was not scheduled) does not count against the peers. Raises `DistError` when the store fails.
        """
        self.store.add(self.key("beat", self.rank), 1)
        values = self.store.multi_get(keys)
        for i, value in enumerate(values):
            silent[i] = silent[i] + elapsed if value == counters[i] else 0.0
            counters[i] = value
        stale = [(rank, age) for rank, age in zip(self.peers, silent) if age >= self.timeout_s]
        return [(rank, age) for rank, age in stale if not self.store.check([self.key("done", rank)])]

    def _stopped_message(self, stale: list[tuple[int, float]]) -> str:
        """Name each stale rank (pid, machine) and kill those on this machine; the line `end` logs."""
        parts, killed = [], []
        for rank, age in stale:
            try:
                who = self.key("who", rank)
                identity = json.loads(self.store.get(who)) if self.store.check([who]) else None
            except dist.DistError:
                identity = None
            where = f"pid {identity['pid']} on {identity['host']}" if identity else "never registered"
            parts.append(f"rank {rank} ({where}) stopped answering: no heartbeat for {age:.1f} s")
            if identity and kill_if_same_process(identity):
                killed.append(f"rank {rank}")
        kills = f"; killed {', '.join(killed)} (on this machine)" if killed else ""
        return (
            f"{'; '.join(parts)} (config.distributed_timeout_s={self.timeout_s:g}){kills}; "
            f"rank {self.rank} ends itself so that the launcher ends the job"
        )

    def _store_lost_message(self, age: float) -> str:
        return (
            f"the job's store at {self.address} has not answered for {age:.1f} s "
            f"(config.distributed_timeout_s={self.timeout_s:g}): its host (the launcher on the main machine, or rank 0 "
            f"where it serves the store) stopped answering or is gone; rank {self.rank} ends itself"
        )


def _store_address() -> tuple[str, int] | None:
    """`MASTER_ADDR:MASTER_PORT`, where `init_process_group("env://")` found the job's store, or None."""
    host, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT", "")
    return (host, int(port)) if host and port.isdigit() else None


@contextlib.contextmanager
def watching(timeout_s: float) -> Iterator[Heartbeat | None]:
    """Run a `Heartbeat` for this process during the block (nothing for a single process).

    Every process of the job must enter the block. Leaving it, also by an exception, marks this
    process as finished for the others.
    """
    state = PartialState()
    address = _store_address()
    if state.num_processes == 1:
        yield None
        return
    try:
        if address is None:
            raise dist.DistError("MASTER_ADDR / MASTER_PORT are not set")
        store = dist.TCPStore(*address, is_master=False, wait_for_workers=False, timeout=datetime.timedelta(seconds=timeout_s))
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        prefix = f"flow_grpo/heartbeat/{os.environ.get('TORCHELASTIC_RUN_ID', 'run')}/{restart}/"
        heartbeat = Heartbeat(store, state.process_index, state.num_processes, timeout_s, prefix, f"{address[0]}:{address[1]}")
        heartbeat.start()
    except dist.DistError as error:
        logger.warning(
            f"no heartbeat: the job's store is out of reach ({error}); a stopped process ends the job only "
            "through the collective timeout, without its rank named",
            main_process_only=False,
        )
        yield None
        return
    try:
        yield heartbeat
    finally:
        heartbeat.stop()
