"""Reward registry, weighted multi-reward and background scoring.

Every reward follows one call signature::

    reward(images, prompts, metadata) -> torch.Tensor

- ``images``: ``(N, 3, H, W)``, float with values in ``[0, 1]`` or uint8 in ``0..255`` (what the
  trainer hands over: `flow_grpo.rewards.images.to_uint8` of the decoded images), on any device.
- ``prompts``: ``list[str]`` of length ``N``.
- ``metadata``: ``list[dict]`` of length ``N`` (e.g. GenEval ``include`` / ``exclude`` entries).
- returns: float32 tensor ``(N,)`` on the CPU, higher is better; or, for a reward with per-image
  details (declared in its ``detail_names``), a mapping ``{"score": (N,), detail: (N,), ...}``
  (:mod:`flow_grpo.rewards.score_details`).

Rewards are registered as *factories* so that heavy models are only loaded for the rewards a run
actually uses::

    @register_reward("my_reward")
    def make_my_reward(device: torch.device, options: Mapping[str, Any]) -> RewardFn:
        model = load(options["model_path"]).to(device)
        def score(images, prompts, metadata):
            ...
        return score
"""

from __future__ import annotations

import concurrent.futures
import math
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch

from flow_grpo.command_flags import InputValueError
from flow_grpo.rewards.score_details import detail_names_of, split_scores

__all__ = [
    "AVERAGE_KEY",
    "AsyncScorer",
    "MultiReward",
    "RewardFactory",
    "RewardFn",
    "available_rewards",
    "build_reward",
    "check_reward_names",
    "register_reward",
]

RewardFn = Callable[[torch.Tensor, Sequence[str], Sequence[Mapping[str, Any]]], torch.Tensor]
"""``reward(images (N, 3, H, W) in [0, 1] or uint8, prompts, metadata) -> float32 (N,) on CPU``."""

RewardFactory = Callable[[torch.device, Mapping[str, Any]], RewardFn]
"""``factory(device, options) -> RewardFn``; ``options`` holds per-reward settings."""

AVERAGE_KEY = "avg"
"""Key of the weighted sum in the dict returned by :class:`MultiReward`; no reward may use it."""

_REGISTRY: dict[str, RewardFactory] = {}
_REGISTRY_LOCK = threading.Lock()


def register_reward(name: str) -> Callable[[RewardFactory], RewardFactory]:
    """Decorator that registers ``factory(device, options) -> RewardFn`` under ``name``.

    Raises:
        ValueError: if ``name`` is empty, reserved (``"avg"``) or already registered.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"A reward name must be a non-empty string, got {name!r}.")
    if name == AVERAGE_KEY:
        raise ValueError(
            f"The reward name {AVERAGE_KEY!r} is reserved for the weighted sum; pick another name."
        )

    def decorator(factory: RewardFactory) -> RewardFactory:
        with _REGISTRY_LOCK:
            if name in _REGISTRY:
                raise ValueError(
                    f"A reward named {name!r} is already registered "
                    f"(by {_REGISTRY[name].__module__}); give the new reward a different name."
                )
            _REGISTRY[name] = factory
        return factory

    return decorator


def available_rewards() -> list[str]:
    """Names of all registered rewards, sorted."""
    with _REGISTRY_LOCK:
        return sorted(_REGISTRY)


def check_reward_names(names: Iterable[str]) -> None:
    """Check that every name is a registered reward, without building anything.

    Meant for config validation before any model is loaded.

    Raises:
        InputValueError: naming the unknown rewards and listing the available ones (a `ValueError`).
    """
    names = list(names)
    known = set(available_rewards())
    unknown = [name for name in names if name not in known]
    if unknown:
        raise InputValueError(
            f"Unknown reward(s) {unknown}; available rewards: {sorted(known)}; "
            "fix the reward name, or import the module that registers it"
        )


class MultiReward:
    """A weighted combination of registered rewards.

    Calling it returns one raw (unweighted) float32 ``(N,)`` CPU tensor per configured reward, one
    per declared detail of a reward (``"<reward>/<detail>"``, not weighted) and
    ``"avg"`` = ``sum_k weight_k * score_k``.
    """

    def __init__(self, rewards: Mapping[str, RewardFn], weights: Mapping[str, float]) -> None:
        """Combine already built reward functions.

        Args:
            rewards: name -> reward function.
            weights: name -> weight; must have exactly the same names as ``rewards``.
        """
        if not rewards:
            raise ValueError("MultiReward needs at least one reward.")
        if set(rewards) != set(weights):
            raise ValueError(
                f"Rewards {sorted(rewards)} and weights {sorted(weights)} must name the same rewards."
            )
        self._rewards = dict(rewards)
        self._weights = {name: float(weights[name]) for name in self._rewards}
        self._details = {name: detail_names_of(reward) for name, reward in self._rewards.items()}

    @property
    def names(self) -> list[str]:
        """Names of the configured rewards, in configuration order."""
        return list(self._rewards)

    @property
    def detail_names(self) -> list[str]:
        """Keys of the rewards' details in every result: ``"<reward>/<detail>"``, in configuration order."""
        return [f"{name}/{detail}" for name, details in self._details.items() for detail in details]

    @property
    def weights(self) -> dict[str, float]:
        """A copy of name -> weight."""
        return dict(self._weights)

    def __call__(
        self,
        images: torch.Tensor,
        prompts: Sequence[str],
        metadata: Sequence[Mapping[str, Any]],
    ) -> dict[str, torch.Tensor]:
        """Score a batch.

        Args:
            images: float ``(N, 3, H, W)`` in ``[0, 1]``, any device.
            prompts: ``N`` prompts.
            metadata: ``N`` metadata dicts.

        Returns:
            ``{name: (N,) float32 CPU, ..., "<name>/<detail>": (N,), ..., "avg": (N,) float32 CPU}``.
        """
        num = _check_batch(images, prompts, metadata)
        scores: dict[str, torch.Tensor] = {}
        total = torch.zeros(num, dtype=torch.float32)
        for name, reward in self._rewards.items():
            score, details = split_scores(reward(images, prompts, metadata), name, num, self._details[name])
            scores[name] = score
            scores.update({f"{name}/{detail}": value for detail, value in details.items()})
            total += self._weights[name] * score
        scores[AVERAGE_KEY] = total
        return scores

    def select(self, weights: Mapping[str, float]) -> "MultiReward":
        """A MultiReward over some of these rewards with new weights, sharing the built models."""
        missing = sorted(set(weights) - set(self._rewards))
        if missing:
            raise ValueError(f"Rewards {missing} were not built; built rewards: {self.names}.")
        return MultiReward({name: self._rewards[name] for name in weights}, weights)

    def __repr__(self) -> str:
        return f"MultiReward({self._weights})"


def build_reward(
    weights: Mapping[str, float],
    device: torch.device | str,
    options: Mapping[str, Mapping[str, Any]] | None = None,
) -> MultiReward:
    """Build every reward named in ``weights`` and combine them.

    Args:
        weights: reward name -> weight in the ``"avg"`` sum, e.g. ``{"pickscore": 1.0}``.
        device: device the reward models are loaded on.
        options: reward name -> per-reward settings (e.g. a model path); rewards without an
            entry get ``{}``. Entries for known rewards that are not in ``weights`` are ignored.

    Raises:
        ValueError: on empty weights, unknown names or non-finite weights.
    """
    if not weights:
        raise ValueError(
            f"No reward configured: give at least one reward name with a weight, "
            f"e.g. {{'jpeg_compressibility': 1.0}}. Available rewards: {available_rewards()}."
        )
    options = dict(options or {})
    check_reward_names(list(weights) + list(options))
    for name, weight in weights.items():
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise ValueError(f"The weight of reward {name!r} must be a finite number, got {weight!r}.")
    device = torch.device(device)
    with _REGISTRY_LOCK:
        factories = {name: _REGISTRY[name] for name in weights}
    rewards = {name: factory(device, dict(options.get(name, {}))) for name, factory in factories.items()}
    return MultiReward(rewards, weights)


class AsyncScorer:
    """Run a :class:`MultiReward` in background threads so scoring overlaps sampling.

    Usage::

        with AsyncScorer(reward) as scorer:
            future = scorer.submit(images.cpu(), prompts, metadata)
            ...  # sample the next batch
            scores = future.result()

    The first batch whose scoring fails ends the scoring: the batches still queued are cancelled,
    a later :meth:`submit` raises that failure, and so does leaving the ``with`` block on an error,
    without waiting for the queued batches. A reward server that stops answering then costs one
    request's bound, not one per queued batch.
    """

    def __init__(self, reward: MultiReward, max_workers: int = 1) -> None:
        """Args: reward: the scorer to run; max_workers: number of background threads (>= 1)."""
        if isinstance(max_workers, bool) or not isinstance(max_workers, int) or max_workers < 1:
            raise ValueError(f"max_workers must be a positive integer, got {max_workers!r}.")
        self.reward = reward
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=max_workers, thread_name_prefix="reward"
        )
        self._closed = False
        self._lock = threading.Lock()
        self._futures: list[concurrent.futures.Future[dict[str, torch.Tensor]]] = []
        self._failure: BaseException | None = None

    def submit(
        self,
        images: torch.Tensor,
        prompts: Sequence[str],
        metadata: Sequence[Mapping[str, Any]],
    ) -> concurrent.futures.Future[dict[str, torch.Tensor]]:
        """Queue a batch for scoring.

        Args:
            images: float ``(N, 3, H, W)`` in ``[0, 1]``; detached here (the caller may move it to
                the CPU first to free accelerator memory).
            prompts: ``N`` prompts.
            metadata: ``N`` metadata dicts.

        Returns:
            A future resolving to the dict of :meth:`MultiReward.__call__`; a reward error is
            raised by ``future.result()``.

        Raises:
            Exception: the failure of an earlier batch (nothing more is scored after it).
        """
        if self._closed:
            raise RuntimeError("This AsyncScorer is closed; create a new one to submit more batches.")
        if self._failure is not None:
            raise self._failure
        _check_batch(images, prompts, metadata)
        future = self._executor.submit(self._score, images.detach(), list(prompts), [dict(m) for m in metadata])
        with self._lock:
            self._futures.append(future)
        future.add_done_callback(self._on_done)
        return future

    def _on_done(self, future: concurrent.futures.Future[dict[str, torch.Tensor]]) -> None:
        """At the first failure, cancel every batch not yet started."""
        if future.cancelled() or future.exception() is None:
            return
        with self._lock:
            if self._failure is None:
                self._failure = future.exception()
            others = [other for other in self._futures if not other.done()]
        for other in others:
            other.cancel()

    def _score(
        self, images: torch.Tensor, prompts: list[str], metadata: list[dict[str, Any]]
    ) -> dict[str, torch.Tensor]:
        # Grad mode is thread-local, so it has to be switched off inside the worker thread.
        with torch.no_grad():
            return self.reward(images, prompts, metadata)

    def close(self, wait: bool = True, cancel: bool = False) -> None:
        """Stop accepting batches; with ``wait``, block until the running batches end.

        The queued batches are scored before that too, unless ``cancel`` drops them.
        """
        self._closed = True
        self._executor.shutdown(wait=wait, cancel_futures=cancel)

    def __enter__(self) -> AsyncScorer:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc_info: object) -> None:
        self.close(cancel=exc_type is not None)


def _check_batch(
    images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]
) -> int:
    """Validate the common reward inputs and return the batch size ``N``."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"Rewards expect images of shape (N, 3, H, W), got {shape}.")
    if not (images.is_floating_point() or images.dtype == torch.uint8):
        raise ValueError(
            f"Rewards expect float images in [0, 1] or uint8 images in 0..255, got dtype {images.dtype}."
        )
    num = images.shape[0]
    if len(prompts) != num or len(metadata) != num:
        raise ValueError(
            f"Got {num} images, {len(prompts)} prompts and {len(metadata)} metadata entries; "
            "pass one prompt and one metadata dict per image."
        )
    return num
