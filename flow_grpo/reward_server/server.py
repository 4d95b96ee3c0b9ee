"""A reward server: hosts scorers behind the JSON protocol of :mod:`flow_grpo.rewards.remote`.

It can host any registered local reward (``pickscore``, ``hpsv2``, ``jpeg_compressibility``, ...)
and the server-side scorers that need their own environment:

- ``geneval``: the GenEval training score from the prompt metadata, with strict and official
  correctness as details (:mod:`flow_grpo.reward_server.geneval`);
- ``ocr``: OCR accuracy against the quoted text of the prompt, as the public Flow-GRPO rule, and
  ``ocr_exact``, the whole-text rule (:mod:`flow_grpo.reward_server.ocr`);
- ``unifiedreward``: a VLM judge served behind an OpenAI-compatible API (:mod:`flow_grpo.reward_server.vlm_judge`);
- ``deqa``: DeQA-Score image quality from a served DeQA-Score model's level-word probabilities (:mod:`flow_grpo.reward_server.deqa`).

Their packages are imported only when the scorer is built, and a missing package is reported
with the command that installs it. Requests are decoded from JSON and base64 only (no pickle) and
bounded by :class:`~flow_grpo.reward_server.frontend.ServerLimits` (:mod:`~flow_grpo.reward_server.frontend`).
Requests for one scorer from all clients are scored together in dynamic batches by one model
instance per device (:mod:`~flow_grpo.reward_server.batching`); requests for different scorers run in
parallel. ``scripts/reward_server.py`` is the command-line front end.
"""

from __future__ import annotations

import importlib
import math
import threading
from collections.abc import Mapping, Sequence
from http import HTTPStatus
from http.server import ThreadingHTTPServer
from typing import Any

import torch

from flow_grpo.command_flags import InputValueError
from flow_grpo.rewards import registry
from flow_grpo.rewards.library_logging import get_logger
from flow_grpo.rewards.registry import RewardFn
from flow_grpo.rewards.score_details import SCORE_KEY
from flow_grpo.rewards.transport import PROTOCOL_VERSION, ImageBudgetError, decode_images
from flow_grpo.reward_server.batching import BatchingScorer, ScoreTimeoutError
from flow_grpo.reward_server.frontend import ServerLimits, make_handler

__all__ = [
    "SERVER_SCORERS",
    "RewardServer",
    "ScorerInputError",
    "ServerLimits",
    "build_replicas",
    "build_scorers",
    "check_scorer_names",
]

logger = get_logger(__name__)

SERVER_SCORERS: dict[str, str] = {
    "geneval": "flow_grpo.reward_server.geneval:make_geneval_scorer",
    "ocr": "flow_grpo.reward_server.ocr:make_ocr_scorer",
    "ocr_exact": "flow_grpo.reward_server.ocr:make_ocr_exact_scorer",
    "unifiedreward": "flow_grpo.reward_server.vlm_judge:make_unifiedreward_scorer",
    "deqa": "flow_grpo.reward_server.deqa:make_deqa_scorer",
}
"""Server-side scorers (``name -> "module:factory"``); their factories take ``(device, options)``."""


class ScorerInputError(ValueError):
    """A request the scorer cannot score (e.g. missing GenEval metadata); answered with HTTP 422."""


class _HTTPServer(ThreadingHTTPServer):
    """One thread per connection; a listen backlog deep enough for a burst of clients."""

    # With the default backlog of 5, a burst of connections overflows it and the kernel drops
    # connection attempts, which clients see as no answer; the kernel caps this at somaxconn.
    request_queue_size = 1024
    daemon_threads = True


def check_scorer_names(names: Sequence[str], options: Mapping[str, Any] | None = None) -> None:
    """Check, before anything loads, that a server can host every scorer of `names` and that `options` names no other.

    Raises:
        InputValueError: for no name, an unknown name, a remote client reward (which would call a
            server itself) or options for a scorer that is not hosted.
    """
    if not names:
        raise InputValueError("--scorers names no scorer; give e.g. --scorers geneval,ocr")
    local = sorted(name for name in registry.available_rewards() if not getattr(registry._REGISTRY[name], "remote", False))
    for name in names:
        if name in SERVER_SCORERS:
            continue
        if name not in registry.available_rewards():
            raise InputValueError(
                f"--scorers: unknown scorer {name!r}; use a server scorer {sorted(SERVER_SCORERS)} or a local reward {local}"
            )
        if getattr(registry._REGISTRY[name], "remote", False):
            raise InputValueError(
                f"--scorers: {name!r} is a remote client reward, which a server cannot host; host a local reward "
                f"{local} or one of the server scorers {sorted(SERVER_SCORERS)}"
            )
    unhosted = sorted(set(options or {}) - set(names))
    if unhosted:
        raise InputValueError(
            f"--options names scorers {unhosted} that are not hosted (hosted: {list(names)}); "
            "drop their options or add them to --scorers"
        )


def build_scorers(
    names: Sequence[str], device: torch.device | str, options: Mapping[str, Mapping[str, Any]] | None = None
) -> dict[str, RewardFn]:
    """Build the scorers a server hosts.

    Args:
        names: scorer names: keys of :data:`SERVER_SCORERS` or registered local rewards.
        device: device the models are loaded on.
        options: scorer name -> options passed to its factory.

    Raises:
        InputValueError: see :func:`check_scorer_names` (a ``ValueError``).
    """
    options = dict(options or {})
    check_scorer_names(names, options)
    device = torch.device(device)
    scorers: dict[str, RewardFn] = {}
    for name in names:
        scorer_options = dict(options.get(name, {}))
        if name in SERVER_SCORERS:
            module_name, _, factory_name = SERVER_SCORERS[name].partition(":")
            factory = getattr(importlib.import_module(module_name), factory_name)
        else:
            factory = registry._REGISTRY[name]
        scorers[name] = factory(device, scorer_options)
        logger.info("Scorer %r ready", name)
    return scorers


def build_replicas(
    names: Sequence[str], devices: Sequence[torch.device | str], options: Mapping[str, Mapping[str, Any]] | None = None
) -> dict[str, list[RewardFn]]:
    """One instance of every scorer per device: ``name -> [replica on devices[0], ...]``.

    Raises:
        InputValueError: for an empty device list or a bad scorer name (see :func:`check_scorer_names`).
    """
    if not devices:
        raise InputValueError("--devices lists no device; give e.g. 'cuda:0,cuda:1' or 'cpu'")
    replicas: dict[str, list[RewardFn]] = {name: [] for name in names}
    for device in devices:
        for name, scorer in build_scorers(names, device, options).items():
            replicas[name].append(scorer)
    return replicas


class RewardServer:
    """A threaded HTTP server hosting scorers, each scored in dynamic batches by its replicas.

    Usage::

        with RewardServer({"jpeg_compressibility": jpeg_compressibility}, port=0) as server:
            client = RemoteReward(server.url, "jpeg_compressibility")

    ``scorers`` maps a name to one scorer or to a list of replicas (one per device, see
    :func:`build_replicas`); requests for a scorer are balanced across its replicas.
    """

    def __init__(
        self,
        scorers: Mapping[str, RewardFn | Sequence[RewardFn]],
        host: str = "127.0.0.1",
        port: int = 0,
        limits: ServerLimits | None = None,
        devices: Sequence[str] = (),
    ) -> None:
        """Bind the socket (``port=0`` picks a free port); :meth:`start` or :meth:`serve_forever` serves."""
        if not scorers:
            raise ValueError("A reward server needs at least one scorer.")
        self.limits = limits or ServerLimits()
        self.devices = [str(device) for device in devices]
        self.queues = {
            name: BatchingScorer(
                name,
                list(scorer) if isinstance(scorer, Sequence) else [scorer],
                self.limits.max_batch,
                self.limits.max_wait_ms / 1000,
            )
            for name, scorer in scorers.items()
        }
        self._httpd = _HTTPServer((host, port), make_handler(self.limits, self.health, self.score))
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """``http://host:port`` of the bound socket."""
        host, port = self._httpd.server_address[:2]
        if ":" in str(host):
            host = f"[{host}]"
        return f"http://{host}:{port}"

    def start(self) -> RewardServer:
        """Serve in a background daemon thread and return ``self``."""
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.1}, name="reward-server", daemon=True
        )
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        """Serve in the calling thread until :meth:`close` (or KeyboardInterrupt)."""
        self._httpd.serve_forever()

    def close(self) -> None:
        """Stop serving, stop the scorer workers and release the socket."""
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join()
            self._thread = None
        self._httpd.server_close()
        for queue in self.queues.values():
            queue.close()

    def __enter__(self) -> RewardServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def health(self) -> dict[str, Any]:
        """The ``/health`` answer: scorers, replicas per scorer, devices and request limits."""
        return {
            "status": "ok",
            "protocol": PROTOCOL_VERSION,
            "scorers": sorted(self.queues),
            "replicas": {name: len(queue.replicas) for name, queue in sorted(self.queues.items())},
            "devices": self.devices,
            "limits": self.limits.as_dict(),
        }

    def score(self, payload: Mapping[str, Any]) -> tuple[int, dict[str, Any]]:
        """Handle a ``/score`` request; returns ``(HTTP status, JSON answer)``."""
        if not isinstance(payload, Mapping):
            return HTTPStatus.BAD_REQUEST, {"error": "The request body must be a JSON object."}
        name = payload.get("scorer")
        if not isinstance(name, str) or name not in self.queues:
            return HTTPStatus.NOT_FOUND, {
                "error": f"This server does not host scorer {name!r}; it hosts {sorted(self.queues)}."
            }
        protocol = payload.get("protocol", PROTOCOL_VERSION)
        if isinstance(protocol, bool) or protocol != PROTOCOL_VERSION:
            return HTTPStatus.BAD_REQUEST, {
                "error": f"This server speaks protocol {PROTOCOL_VERSION}, the request declares {protocol!r}; "
                "use a client of the same flow_grpo version as the server."
            }
        images = payload.get("images")
        if isinstance(images, list) and len(images) > self.limits.max_batch:
            # Counted before a single image is decoded.
            return HTTPStatus.REQUEST_ENTITY_TOO_LARGE, {
                "error": f"Request of {len(images)} images exceeds max_batch = {self.limits.max_batch}; "
                "send smaller batches (the limits are on /health)."
            }
        try:
            images = decode_images(payload, self.limits.max_pixels)
            prompts, metadata = payload.get("prompts"), payload.get("metadata")
            if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
                raise ValueError("'prompts' must be a list of strings.")
            if not isinstance(metadata, list) or not all(isinstance(m, dict) for m in metadata):
                raise ValueError("'metadata' must be a list of objects.")
            if not len(prompts) == len(metadata) == images.shape[0]:
                raise ValueError(
                    f"Got {images.shape[0]} images, {len(prompts)} prompts and {len(metadata)} metadata entries."
                )
        except ImageBudgetError as error:
            budget = f"{error} Send smaller batches (the limits are on /health)."
            return HTTPStatus.REQUEST_ENTITY_TOO_LARGE, {"error": budget}
        except ValueError as error:
            return HTTPStatus.BAD_REQUEST, {"error": str(error)}
        try:
            scores = self.queues[name].score(images, prompts, metadata, timeout=self.limits.score_timeout_s)
        except ScorerInputError as error:
            return HTTPStatus.UNPROCESSABLE_ENTITY, {"error": f"Scorer {name!r}: {error}"}
        except ScoreTimeoutError as error:
            return HTTPStatus.GATEWAY_TIMEOUT, {"error": str(error)}
        except Exception as error:  # report any scorer failure to the client instead of dropping the connection
            return HTTPStatus.INTERNAL_SERVER_ERROR, {
                "error": f"Scorer {name!r} failed: {type(error).__name__}: {error}"
            }
        score = scores[SCORE_KEY]
        if not torch.isfinite(score).all():
            return HTTPStatus.INTERNAL_SERVER_ERROR, {
                "error": f"Scorer {name!r} returned {int((~torch.isfinite(score)).sum())} non-finite values "
                f"for {len(prompts)} images."
            }
        answer: dict[str, Any] = {"scores": score.tolist()}
        details = {key: value for key, value in scores.items() if key != SCORE_KEY}
        if details:
            # A detail is NaN where it does not apply; JSON has no NaN, so it travels as null.
            answer["details"] = {
                key: [v if math.isfinite(v) else None for v in value.tolist()] for key, value in details.items()
            }
        return HTTPStatus.OK, answer
