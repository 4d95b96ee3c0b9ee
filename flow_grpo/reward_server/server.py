"""A reward server: hosts scorers behind the JSON protocol of :mod:`flow_grpo.rewards.remote`.

It can host any registered local reward (``pickscore``, ``hpsv2``, ``jpeg_compressibility``, ...)
and the server-side scorers that need their own environment:

- ``geneval``: strict GenEval accuracy from the prompt metadata (:mod:`flow_grpo.reward_server.geneval`);
- ``ocr``: OCR accuracy against the quoted text of the prompt (:mod:`flow_grpo.reward_server.ocr`);
- ``unifiedreward``: a VLM judge served behind an OpenAI-compatible API (:mod:`flow_grpo.reward_server.vlm_judge`).

Their packages are imported only when the scorer is built, and a missing package is reported
with the command that installs it. Requests are decoded from JSON and base64 only (no pickle),
bounded in size, and a scorer runs one request at a time (requests for different scorers run in
parallel). ``scripts/reward_server.py`` is the command-line front end.
"""

from __future__ import annotations

import importlib
import json
import threading
from collections.abc import Mapping, Sequence
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import torch
from accelerate.logging import get_logger

from flow_grpo.rewards import registry
from flow_grpo.rewards.registry import RewardFn
from flow_grpo.rewards.remote import PROTOCOL_VERSION, decode_images

__all__ = ["SERVER_SCORERS", "RewardServer", "ScorerInputError", "build_scorers"]

logger = get_logger(__name__)

SERVER_SCORERS: dict[str, str] = {
    "geneval": "flow_grpo.reward_server.geneval:make_geneval_scorer",
    "ocr": "flow_grpo.reward_server.ocr:make_ocr_scorer",
    "unifiedreward": "flow_grpo.reward_server.vlm_judge:make_unifiedreward_scorer",
}
"""Server-side scorers (``name -> "module:factory"``); their factories take ``(device, options)``."""


class ScorerInputError(ValueError):
    """A request the scorer cannot score (e.g. missing GenEval metadata); answered with HTTP 422."""


def build_scorers(
    names: Sequence[str], device: torch.device | str, options: Mapping[str, Mapping[str, Any]] | None = None
) -> dict[str, RewardFn]:
    """Build the scorers a server hosts.

    Args:
        names: scorer names: keys of :data:`SERVER_SCORERS` or registered local rewards.
        device: device the models are loaded on.
        options: scorer name -> options passed to its factory.

    Raises:
        ValueError: for an unknown name or a remote client reward (which would call a server itself).
    """
    options = dict(options or {})
    unknown_options = sorted(set(options) - set(names))
    if unknown_options:
        raise ValueError(f"Options given for scorers {unknown_options} that are not hosted; hosted: {list(names)}.")
    device = torch.device(device)
    scorers: dict[str, RewardFn] = {}
    for name in names:
        scorer_options = dict(options.get(name, {}))
        if name in SERVER_SCORERS:
            module_name, _, factory_name = SERVER_SCORERS[name].partition(":")
            factory = getattr(importlib.import_module(module_name), factory_name)
        else:
            registry.check_reward_names([name])
            factory = registry._REGISTRY[name]
            if getattr(factory, "remote", False):
                raise ValueError(
                    f"{name!r} is a remote client reward; a server cannot host it. Host a local reward "
                    f"or one of the server scorers {sorted(SERVER_SCORERS)}."
                )
        scorers[name] = factory(device, scorer_options)
        logger.info("Scorer %r ready", name)
    return scorers


class RewardServer:
    """A threaded HTTP server hosting ``scorers``.

    Usage::

        with RewardServer({"jpeg_compressibility": jpeg_compressibility}, port=0) as server:
            client = RemoteReward(server.url, "jpeg_compressibility")
    """

    def __init__(
        self,
        scorers: Mapping[str, RewardFn],
        host: str = "127.0.0.1",
        port: int = 0,
        max_request_bytes: int = 512 * 1024 * 1024,
        max_pixels: int = 4096 * 4096,
    ) -> None:
        """Bind the socket (``port=0`` picks a free port); :meth:`start` or :meth:`serve_forever` serves."""
        if not scorers:
            raise ValueError("A reward server needs at least one scorer.")
        self.scorers = dict(scorers)
        self.max_request_bytes = int(max_request_bytes)
        self.max_pixels = int(max_pixels)
        self._locks = {name: threading.Lock() for name in self.scorers}
        self._httpd = ThreadingHTTPServer((host, port), _make_handler(self))
        self._httpd.daemon_threads = True
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
        """Stop serving and release the socket."""
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join()
            self._thread = None
        self._httpd.server_close()

    def __enter__(self) -> RewardServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def health(self) -> dict[str, Any]:
        """The ``/health`` answer."""
        return {"status": "ok", "protocol": PROTOCOL_VERSION, "scorers": sorted(self.scorers)}

    def score(self, payload: Mapping[str, Any]) -> tuple[int, dict[str, Any]]:
        """Handle a ``/score`` request; returns ``(HTTP status, JSON answer)``."""
        if not isinstance(payload, Mapping):
            return HTTPStatus.BAD_REQUEST, {"error": "The request body must be a JSON object."}
        name = payload.get("scorer")
        if not isinstance(name, str) or name not in self.scorers:
            return HTTPStatus.NOT_FOUND, {
                "error": f"This server does not host scorer {name!r}; it hosts {sorted(self.scorers)}."
            }
        try:
            images = decode_images(payload, self.max_pixels)
            prompts, metadata = payload.get("prompts"), payload.get("metadata")
            if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
                raise ValueError("'prompts' must be a list of strings.")
            if not isinstance(metadata, list) or not all(isinstance(m, dict) for m in metadata):
                raise ValueError("'metadata' must be a list of objects.")
            if not len(prompts) == len(metadata) == images.shape[0]:
                raise ValueError(
                    f"Got {images.shape[0]} images, {len(prompts)} prompts and {len(metadata)} metadata entries."
                )
        except ValueError as error:
            return HTTPStatus.BAD_REQUEST, {"error": str(error)}
        try:
            with self._locks[name], torch.no_grad():
                scores = self.scorers[name](images, prompts, metadata)
        except ScorerInputError as error:
            return HTTPStatus.UNPROCESSABLE_ENTITY, {"error": f"Scorer {name!r}: {error}"}
        except Exception as error:  # report any scorer failure to the client instead of dropping the connection
            logger.exception("Scorer %r failed", name)
            return HTTPStatus.INTERNAL_SERVER_ERROR, {
                "error": f"Scorer {name!r} failed: {type(error).__name__}: {error}"
            }
        scores = torch.as_tensor(scores).detach().float().cpu().reshape(-1)
        if scores.numel() != len(prompts) or not torch.isfinite(scores).all():
            return HTTPStatus.INTERNAL_SERVER_ERROR, {
                "error": f"Scorer {name!r} returned {scores.numel()} values (non-finite: "
                f"{int((~torch.isfinite(scores)).sum())}) for {len(prompts)} images."
            }
        return HTTPStatus.OK, {"scores": scores.tolist()}


def _make_handler(server: RewardServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "flow-grpo-reward-server"

        def do_GET(self) -> None:
            if self.path.rstrip("/") == "/health":
                self._answer(HTTPStatus.OK, server.health())
            else:
                self._answer(HTTPStatus.NOT_FOUND, {"error": f"Unknown path {self.path!r}; use /health or /score."})

        def do_POST(self) -> None:
            if self.path.rstrip("/") != "/score":
                self._answer(HTTPStatus.NOT_FOUND, {"error": f"Unknown path {self.path!r}; POST to /score."})
                return
            length = self.headers.get("Content-Length")
            if length is None or not length.isdigit():
                self._answer(HTTPStatus.LENGTH_REQUIRED, {"error": "A Content-Length header is required."})
                return
            if int(length) > server.max_request_bytes:
                self._answer(
                    HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                    {"error": f"Request of {length} bytes exceeds {server.max_request_bytes}; send smaller batches."},
                )
                return
            body = self.rfile.read(int(length))
            try:
                payload = json.loads(body.decode("utf-8"))
            except (UnicodeDecodeError, ValueError) as error:
                self._answer(HTTPStatus.BAD_REQUEST, {"error": f"The request body is not valid JSON: {error}"})
                return
            status, answer = server.score(payload)
            self._answer(status, answer)

        def _answer(self, status: int, answer: dict[str, Any]) -> None:
            data = json.dumps(answer).encode("utf-8")
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            if status == HTTPStatus.REQUEST_ENTITY_TOO_LARGE:
                self.send_header("Connection", "close")
                self.close_connection = True
            self.end_headers()
            try:
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):
                # The client gave up (e.g. its timeout passed); nothing is left to answer.
                logger.debug("Client %s went away before the answer", self.address_string())

        def log_message(self, format: str, *args: Any) -> None:
            logger.debug("%s - %s", self.address_string(), format % args)

    return Handler
