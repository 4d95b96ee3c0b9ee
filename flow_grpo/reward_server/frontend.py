"""HTTP front end of the reward server: reads requests within bounds and answers JSON.

What one client can cost is bounded here (see :class:`ServerLimits`): at most ``max_concurrent``
requests are read and scored at once (further requests wait up to ``read_timeout_s`` for a slot,
then get 503), a body must arrive completely within ``read_timeout_s`` (else 408), a body over
``max_request_bytes`` is refused before it is read (413), and JSON nested too deeply for the parser
is a 400, never a dropped connection.
"""

from __future__ import annotations

import json
import math
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from typing import Any

from accelerate.logging import get_logger

__all__ = ["Endpoints", "RequestHandler", "ServerLimits", "default_max_request_bytes", "make_handler"]

logger = get_logger(__name__)

_REFERENCE_IMAGE_BYTES = 512 * 512 * 3
"""Raw bytes of one 512x512 RGB uint8 image, the size the default body limit is computed for."""


def default_max_request_bytes(max_batch: int) -> int:
    """Body limit for ``max_batch`` raw 512x512 images: base64 (4/3) with 25 % headroom plus 1 MiB.

    ``max_batch = 64`` gives 84,934,656 bytes (81 MiB); larger images are sent in smaller requests.
    """
    return math.ceil(max_batch * _REFERENCE_IMAGE_BYTES * 4 / 3 * 1.25) + 1024 * 1024


@dataclass(frozen=True)
class ServerLimits:
    """Batching and resource limits of a reward server (all reported on ``/health``)."""

    max_batch: int = 64
    """Most images per scorer call and per request."""
    max_wait_ms: float = 20.0
    """Longest time the oldest queued request waits for companions to fill a batch."""
    max_concurrent: int = 32
    """Requests read and scored at once; further requests wait up to ``read_timeout_s``, then get 503."""
    max_request_bytes: int = 0
    """Largest request body; 0 = :func:`default_max_request_bytes` of ``max_batch``."""
    max_pixels: int = 4096 * 4096
    """Largest accepted image (``height * width``)."""
    read_timeout_s: float = 60.0
    """Longest time to receive one request body (and to wait for a free request slot)."""
    score_timeout_s: float = 600.0
    """Longest time a request waits for its scores (then 504)."""

    def __post_init__(self) -> None:
        checks = {
            "max_batch": self.max_batch >= 1,
            "max_wait_ms": self.max_wait_ms >= 0,
            "max_concurrent": self.max_concurrent >= 1,
            "max_request_bytes": self.max_request_bytes >= 0,
            "max_pixels": self.max_pixels >= 1,
            "read_timeout_s": self.read_timeout_s > 0,
            "score_timeout_s": self.score_timeout_s > 0,
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"Reward server limit {name} = {getattr(self, name)} is out of range; see --help.")
        if not self.max_request_bytes:
            object.__setattr__(self, "max_request_bytes", default_max_request_bytes(self.max_batch))

    def as_dict(self) -> dict[str, Any]:
        """The limits a client needs, for ``/health``."""
        return {
            "max_batch": self.max_batch,
            "max_request_bytes": self.max_request_bytes,
            "max_pixels": self.max_pixels,
            "max_concurrent": self.max_concurrent,
        }


Answer = tuple[int, dict[str, Any]]


@dataclass(frozen=True)
class Endpoints:
    """What a :class:`RequestHandler` serves: the limits, the ``/health`` answer and the scorer."""

    limits: ServerLimits
    health: Callable[[], dict[str, Any]]
    """Returns the ``/health`` answer."""
    score: Callable[[Mapping[str, Any]], Answer]
    """Takes a decoded ``/score`` request and returns ``(status, answer)``."""
    slots: threading.BoundedSemaphore
    """One per request read and scored at once (``limits.max_concurrent``)."""


class RequestHandler(BaseHTTPRequestHandler):
    """Serves ``GET /health`` and ``POST /score`` within ``endpoints.limits``; subclass it with :func:`make_handler`."""

    protocol_version = "HTTP/1.1"
    server_version = "flow-grpo-reward-server"
    endpoints: Endpoints
    """Set on the subclass :func:`make_handler` builds."""

    def do_GET(self) -> None:
        if self.path.rstrip("/") == "/health":
            self._answer(HTTPStatus.OK, self.endpoints.health())
        else:
            self._answer(HTTPStatus.NOT_FOUND, {"error": f"Unknown path {self.path!r}; use /health or /score."})

    def do_POST(self) -> None:
        limits = self.endpoints.limits
        if self.path.rstrip("/") != "/score":
            unknown = {"error": f"Unknown path {self.path!r}; POST to /score."}
            self._answer(HTTPStatus.NOT_FOUND, unknown, close=True)
            return
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            self._answer(HTTPStatus.LENGTH_REQUIRED, {"error": "A Content-Length header is required."}, close=True)
            return
        if int(length) > limits.max_request_bytes:
            self._answer(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                {
                    "error": f"Request of {length} bytes exceeds {limits.max_request_bytes}; send smaller "
                    "batches (the limits are on /health)."
                },
                close=True,
            )
            return
        if not self.endpoints.slots.acquire(timeout=limits.read_timeout_s):
            self._answer(
                HTTPStatus.SERVICE_UNAVAILABLE,
                {"error": f"The server is busy ({limits.max_concurrent} requests in progress); retry later."},
                close=True,
                retry_after=True,
            )
            return
        try:
            self._score(int(length))
        finally:
            self.endpoints.slots.release()

    def _score(self, length: int) -> None:
        body = self._read_body(length)
        if body is None:
            self._answer(
                HTTPStatus.REQUEST_TIMEOUT,
                {"error": f"The request body did not arrive within {self.endpoints.limits.read_timeout_s:g}s."},
                close=True,
            )
            return
        try:
            payload = json.loads(body.decode("utf-8"))
        except RecursionError:
            self._answer(HTTPStatus.BAD_REQUEST, {"error": "The request body is JSON nested too deeply."})
            return
        except (UnicodeDecodeError, ValueError) as error:
            self._answer(HTTPStatus.BAD_REQUEST, {"error": f"The request body is not valid JSON: {error}"})
            return
        self._answer(*self.endpoints.score(payload))

    def _read_body(self, length: int) -> bytes | None:
        """Read ``length`` bytes within ``read_timeout_s`` in total; ``None`` when too slow."""
        read_timeout_s = self.endpoints.limits.read_timeout_s
        deadline = time.monotonic() + read_timeout_s
        parts: list[bytes] = []
        received = 0
        try:
            while received < length:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self.connection.settimeout(remaining)
                chunk = self.rfile.read1(min(length - received, 1 << 20))
                if not chunk:
                    return None
                parts.append(chunk)
                received += len(chunk)
        except (TimeoutError, socket.timeout, ConnectionError):
            return None
        finally:
            self.connection.settimeout(read_timeout_s)
        return b"".join(parts)

    def _answer(self, status: int, answer: dict[str, Any], close: bool = False, retry_after: bool = False) -> None:
        data = json.dumps(answer).encode("utf-8")
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            if retry_after:
                self.send_header("Retry-After", "1")
            if close:
                # The unread body (if any) would be taken for the next request on this connection.
                self.send_header("Connection", "close")
                self.close_connection = True
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            # The client gave up (e.g. its deadline passed); nothing is left to answer.
            self.close_connection = True
            logger.debug("Client %s went away before the answer", self.address_string())

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("%s - %s", self.address_string(), format % args)


def make_handler(
    limits: ServerLimits, health: Callable[[], dict[str, Any]], score: Callable[[Mapping[str, Any]], Answer]
) -> type[RequestHandler]:
    """A :class:`RequestHandler` subclass serving ``GET /health`` and ``POST /score`` within ``limits``."""
    endpoints = Endpoints(limits, health, score, threading.BoundedSemaphore(limits.max_concurrent))
    # ``timeout`` bounds idle keep-alive connections and stalled header lines.
    return type("Handler", (RequestHandler,), {"endpoints": endpoints, "timeout": limits.read_timeout_s})
