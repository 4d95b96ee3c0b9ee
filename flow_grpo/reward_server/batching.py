"""Dynamic batching of score requests across clients, served by one or more scorer replicas.

A :class:`BatchingScorer` owns one queue per hosted scorer and one worker thread per replica (one
model instance per device). A worker takes the oldest queued request, then gathers further queued
requests with the same image size until the batch holds ``max_batch`` images or ``max_wait_s`` has
passed since the oldest request arrived; it scores the concatenated batch in one call and splits
the scores (and the scorer's per-image details, :mod:`flow_grpo.rewards.score_details`) back per
request. Idle replicas take the next request, so load is balanced across them.

Failures never leave a request waiting: when a batch of several requests fails, each request is
scored again alone so only the faulty one gets the error; every exception (including one escaping
the worker loop itself) is handed to the waiting requests.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate.logging import get_logger

from flow_grpo.rewards.registry import RewardFn
from flow_grpo.rewards.score_details import SCORE_KEY

__all__ = ["BatchingScorer", "ScoreJob", "ScoreTimeoutError"]

logger = get_logger(__name__)


class ScoreTimeoutError(RuntimeError):
    """A request was not scored within the server's score timeout (answered with HTTP 504)."""


@dataclass(eq=False)
class ScoreJob:
    """One client request waiting in a :class:`BatchingScorer` queue."""

    images: torch.Tensor
    """float ``(n, 3, H, W)`` in ``[0, 1]`` (CPU)."""
    prompts: list[str]
    metadata: list[dict[str, Any]]
    enqueued: float = field(default_factory=time.monotonic)
    done: threading.Event = field(default_factory=threading.Event)
    scores: dict[str, torch.Tensor] | None = None
    """Once scored: ``{"score": float32 (n,), detail: (n,), ...}``."""
    error: BaseException | None = None

    @property
    def size(self) -> int:
        return int(self.images.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.images.shape[2]), int(self.images.shape[3])

    def finish(self, scores: dict[str, torch.Tensor] | None = None, error: BaseException | None = None) -> None:
        self.scores, self.error = scores, error
        self.done.set()


class BatchingScorer:
    """Queue of one scorer, scored in dynamic batches by one worker thread per replica.

    Args:
        name: scorer name (for messages).
        replicas: one scorer instance per device, each ``(images, prompts, metadata) -> (N,)`` or
            ``{"score": (N,), detail: (N,), ...}``.
        max_batch: most images scored in one call (one request larger than this is scored alone).
        max_wait_s: longest time the oldest queued request waits for companions.
    """

    def __init__(self, name: str, replicas: Sequence[RewardFn], max_batch: int, max_wait_s: float) -> None:
        if not replicas:
            raise ValueError(f"Scorer {name!r} needs at least one replica.")
        if max_batch < 1:
            raise ValueError(f"max_batch must be positive, got {max_batch}.")
        if max_wait_s < 0:
            raise ValueError(f"max_wait_ms must be 0 or more, got {max_wait_s * 1000:g}.")
        self.name = name
        self.replicas = list(replicas)
        self.max_batch = int(max_batch)
        self.max_wait_s = float(max_wait_s)
        self.batch_sizes: list[int] = []
        """Images per scorer call, in call order (for tests and logs)."""
        self._queue: deque[ScoreJob] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._threads = [
            threading.Thread(target=self._work, args=(index,), name=f"scorer-{name}-{index}", daemon=True)
            for index in range(len(self.replicas))
        ]
        for thread in self._threads:
            thread.start()

    def submit(self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]) -> ScoreJob:
        """Queue a request; its ``done`` event is set once ``scores`` or ``error`` is filled in."""
        job = ScoreJob(images, list(prompts), [dict(m) for m in metadata])
        with self._cond:
            if self._closed:
                raise RuntimeError(f"Scorer {self.name!r} is shut down.")
            self._queue.append(job)
            self._cond.notify_all()
        return job

    def score(
        self,
        images: torch.Tensor,
        prompts: Sequence[str],
        metadata: Sequence[Mapping[str, Any]],
        timeout: float | None = None,
    ) -> dict[str, torch.Tensor]:
        """Queue a request and wait for its scores: ``{"score": float32 (n,), detail: (n,), ...}``.

        Raises:
            ScoreTimeoutError: not scored within ``timeout`` seconds.
            Exception: whatever the scorer raised for this request.
        """
        job = self.submit(images, prompts, metadata)
        if not job.done.wait(timeout):
            with self._cond:
                if job in self._queue:
                    self._queue.remove(job)
            raise ScoreTimeoutError(f"Scorer {self.name!r} did not score the request within {timeout:g}s.")
        if job.error is not None:
            raise job.error
        assert job.scores is not None
        return job.scores

    def close(self) -> None:
        """Stop the workers; queued requests get an error."""
        with self._cond:
            self._closed = True
            pending = list(self._queue)
            self._queue.clear()
            self._cond.notify_all()
        for job in pending:
            job.finish(error=RuntimeError(f"Scorer {self.name!r} shut down before scoring the request."))
        for thread in self._threads:
            thread.join(timeout=5)

    def _next_batch(self) -> list[ScoreJob] | None:
        """Block until a batch is ready (``None`` once closed)."""
        with self._cond:
            while not self._queue:
                if self._closed:
                    return None
                self._cond.wait()
            first = self._queue.popleft()
            batch, size = [first], first.size
            deadline = first.enqueued + self.max_wait_s
            while size < self.max_batch and not self._closed:
                for job in list(self._queue):
                    if job.shape == first.shape and size + job.size <= self.max_batch:
                        self._queue.remove(job)
                        batch.append(job)
                        size += job.size
                remaining = deadline - time.monotonic()
                if size >= self.max_batch or remaining <= 0:
                    break
                self._cond.wait(remaining)
            return batch

    def _work(self, index: int) -> None:
        replica = self.replicas[index]
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            try:
                self._score_batch(replica, batch)
            except BaseException as error:  # never leave a request waiting, whatever happened
                logger.exception("Replica %d of scorer %r failed outside scoring", index, self.name)
                for job in batch:
                    if not job.done.is_set():
                        job.finish(error=error)

    def _score_batch(self, replica: RewardFn, batch: list[ScoreJob]) -> None:
        images = batch[0].images if len(batch) == 1 else torch.cat([job.images for job in batch])
        prompts = [p for job in batch for p in job.prompts]
        metadata = [m for job in batch for m in job.metadata]
        self.batch_sizes.append(int(images.shape[0]))
        try:
            with torch.no_grad():
                scores = _as_columns(replica(images, prompts, metadata))
            for key, column in scores.items():
                if column.numel() != len(prompts):
                    raise RuntimeError(
                        f"Scorer {self.name!r} returned {column.numel()} values of {key!r} for {len(prompts)} images."
                    )
        except Exception as error:
            if len(batch) > 1:
                # Score each request alone so one bad request (e.g. missing metadata) fails by itself.
                for job in batch:
                    self._score_batch(replica, [job])
                return
            if not isinstance(error, ValueError):
                logger.exception("Scorer %r failed", self.name)
            batch[0].finish(error=error)
            return
        sizes = [job.size for job in batch]
        parts = {key: column.split(sizes) for key, column in scores.items()}
        for index, job in enumerate(batch):
            job.finish(scores={key: split[index] for key, split in parts.items()})


def _as_columns(value: Any) -> dict[str, torch.Tensor]:
    """A scorer's return value as ``{"score": float32 (N,), detail: (N,)}`` on the CPU."""
    if not isinstance(value, Mapping):
        value = {SCORE_KEY: value}
    if SCORE_KEY not in value:
        raise RuntimeError(f"A scorer returned the keys {sorted(value)} without {SCORE_KEY!r}.")
    return {key: torch.as_tensor(column).detach().float().cpu().reshape(-1) for key, column in value.items()}
