"""HTTP front end of the reward server: reads requests within bounds and answers JSON.

What one client can cost is bounded here (see :class:`ServerLimits`):

- a request's line and headers must arrive completely within ``read_timeout_s`` of the wait for them
  (the bound covers the whole header, not each read, so a client trickling a byte at a time is cut off);
- at most ``max_concurrent`` requests are read and scored at once and at most ``max_queued`` more wait
  for a slot (up to ``read_timeout_s``, then 503); a request finding the wait line full gets 503 with
  ``Retry-After`` at once;
- a body must arrive completely within ``read_timeout_s`` (else 408), a body over ``max_request_bytes``
  is refused before it is read (413), a ``Content-Length`` that is not ASCII digits is a 400, and JSON
  nested too deeply for the parser is a 400.

Every refusal is an answer, never a dropped connection: an answer that leaves a body unread half-closes
the connection and discards what the client still sends for a moment (:data:`LINGER_S`), so the
client reads the answer instead of a connection reset.
"""

from __future__ import annotations

import io
import json
import math
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from typing import Any, Literal

from flow_grpo.rewards.library_logging import get_logger

__all__ = [
    "LINGER_S",
    "Admission",
    "DeadlineReader",
    "Endpoints",
    "RequestHandler",
    "ServerLimits",
    "default_max_request_bytes",
    "make_handler",
]

logger = get_logger(__name__)

_REFERENCE_IMAGE_BYTES = 512 * 512 * 3
"""Raw bytes of one 512x512 RGB uint8 image, the size the default body limit is computed for."""

LINGER_S = 2.0
"""Longest time spent discarding an unread body after a closing answer (see the module docstring)."""


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
    """Requests read and scored at once."""
    max_queued: int = 32
    """Requests waiting for one of the ``max_concurrent`` slots (up to ``read_timeout_s``); more get 503 at once."""
    max_request_bytes: int = 0
    """Largest request body; 0 = :func:`default_max_request_bytes` of ``max_batch``."""
    max_pixels: int = 4096 * 4096
    """Most pixels one request decodes (images x height x width); bounds the memory of a request."""
    read_timeout_s: float = 60.0
    """Longest time to receive a request's headers, then its body (and to wait for a free request slot)."""
    score_timeout_s: float = 600.0
    """Longest time a request waits for its scores (then 504)."""

    def __post_init__(self) -> None:
        checks = {
            "max_batch": (self.max_batch >= 1, "at least 1"),
            "max_wait_ms": (self.max_wait_ms >= 0, "0 or more"),
            "max_concurrent": (self.max_concurrent >= 1, "at least 1"),
            "max_queued": (self.max_queued >= 0, "0 or more"),
            "max_request_bytes": (self.max_request_bytes >= 0, "0 (the default) or more"),
            "max_pixels": (self.max_pixels >= 1, "at least 1"),
            "read_timeout_s": (self.read_timeout_s > 0, "above 0"),
            "score_timeout_s": (self.score_timeout_s > 0, "above 0"),
        }
        for name, (ok, allowed) in checks.items():
            if not ok:
                raise ValueError(f"reward server limit {name} = {getattr(self, name)} is out of range; it must be {allowed} (see --help)")
        if not self.max_request_bytes:
            object.__setattr__(self, "max_request_bytes", default_max_request_bytes(self.max_batch))

    def as_dict(self) -> dict[str, Any]:
        """The limits a client needs, for ``/health``."""
        return {
            "max_batch": self.max_batch,
            "max_request_bytes": self.max_request_bytes,
            "max_pixels": self.max_pixels,
            "max_concurrent": self.max_concurrent,
            "max_queued": self.max_queued,
        }


Answer = tuple[int, dict[str, Any]]


class Admission:
    """Request slots with a bounded wait line: ``slots`` requests run at once, ``queued`` more may wait."""

    def __init__(self, slots: int, queued: int) -> None:
        self.slots, self.queued = slots, queued
        self._free, self._waiting = slots, 0
        self._cond = threading.Condition()

    def enter(self, timeout: float) -> Literal["admitted", "full", "timed_out"]:
        """Take a slot: at once, or after waiting in line up to ``timeout`` s; ``"full"`` when the line is full."""
        with self._cond:
            if self._free == 0 and self._waiting >= self.queued:
                return "full"
            self._waiting += 1
            try:
                if not self._cond.wait_for(lambda: self._free > 0, timeout):
                    return "timed_out"
            finally:
                self._waiting -= 1
            self._free -= 1
            return "admitted"

    def leave(self) -> None:
        """Give back the slot :meth:`enter` took."""
        with self._cond:
            self._free += 1
            self._cond.notify()


@dataclass(frozen=True)
class Endpoints:
    """What a :class:`RequestHandler` serves: the limits, the ``/health`` answer and the scorer."""

    limits: ServerLimits
    health: Callable[[], dict[str, Any]]
    """Returns the ``/health`` answer."""
    score: Callable[[Mapping[str, Any]], Answer]
    """Takes a decoded ``/score`` request and returns ``(status, answer)``."""
    admission: Admission
    """``limits.max_concurrent`` slots for requests read and scored at once, ``limits.max_queued`` in line."""


class DeadlineReader(io.RawIOBase):
    """The socket's reads with an optional deadline over all of them, not one per ``recv``.

    Args:
        raw: the unbuffered ``socket.makefile("rb", 0)`` of ``sock``.
        sock: the connection; its timeout is set to the time left before every read.
    """

    def __init__(self, raw: io.RawIOBase, sock: socket.socket) -> None:
        super().__init__()
        self._raw, self._sock = raw, sock
        self.deadline: float | None = None
        """``time.monotonic()`` by which the reads must be done; ``None``: only the socket's own timeout."""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int | None:
        if self.deadline is not None:
            remaining = self.deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("the read deadline passed")
            self._sock.settimeout(remaining)
        return self._raw.readinto(buffer)

    def close(self) -> None:
        self._raw.close()
        super().close()


class RequestHandler(BaseHTTPRequestHandler):
    """Serves ``GET /health`` and ``POST /score`` within ``endpoints.limits``; subclass it with :func:`make_handler`."""

    protocol_version = "HTTP/1.1"
    server_version = "flow-grpo-reward-server"
    rbufsize = 0  # the raw socket file, buffered again in setup() over a DeadlineReader
    endpoints: Endpoints
    """Set on the subclass :func:`make_handler` builds."""

    def setup(self) -> None:
        super().setup()
        self.reader = DeadlineReader(self.rfile, self.connection)
        self.rfile = io.BufferedReader(self.reader)

    def handle_one_request(self) -> None:
        # The wait for the request line and all headers together is bounded (a slowloris client
        # sending one byte per read timeout is cut off); do_GET / do_POST lift the bound.
        self.reader.deadline = time.monotonic() + self.endpoints.limits.read_timeout_s
        super().handle_one_request()

    def _headers_read(self) -> None:
        self.reader.deadline = None
        self.connection.settimeout(self.endpoints.limits.read_timeout_s)

    def do_GET(self) -> None:
        self._headers_read()
        if self.path.rstrip("/") == "/health":
            self._answer(HTTPStatus.OK, self.endpoints.health())
        else:
            self._answer(HTTPStatus.NOT_FOUND, {"error": f"Unknown path {self.path!r}; use /health or /score."})

    def do_POST(self) -> None:
        self._headers_read()
        limits = self.endpoints.limits
        length = self._content_length()
        if length is None:
            return
        if self.path.rstrip("/") != "/score":
            unknown = {"error": f"Unknown path {self.path!r}; POST to /score."}
            self._answer(HTTPStatus.NOT_FOUND, unknown, close=True, unread=length)
            return
        if length > limits.max_request_bytes:
            too_large = {
                "error": f"Request of {length} bytes exceeds {limits.max_request_bytes}; send smaller "
                "batches (the limits are on /health)."
            }
            self._answer(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, too_large, close=True, unread=length)
            return
        admission = self.endpoints.admission
        entered = admission.enter(timeout=limits.read_timeout_s)
        if entered != "admitted":
            waited = "" if entered == "full" else f" for {limits.read_timeout_s:g}s"
            busy = {
                "error": f"The server is busy ({limits.max_concurrent} requests in progress, "
                f"{limits.max_queued} waiting{waited}); retry later."
            }
            self._answer(HTTPStatus.SERVICE_UNAVAILABLE, busy, close=True, retry_after=True, unread=length)
            return
        try:
            self._score(length)
        finally:
            admission.leave()

    def _content_length(self) -> int | None:
        """The declared body length; ``None`` once a missing or malformed header has been answered."""
        length = self.headers.get("Content-Length")
        if length is None:
            self._answer(HTTPStatus.LENGTH_REQUIRED, {"error": "A Content-Length header is required."}, close=True)
            return None
        # str.isdigit() also accepts digits of other scripts ('²', '٣'), which int() may refuse.
        if not (length.isascii() and length.isdigit()):
            bad = {"error": f"Content-Length must be ASCII digits, got {length[:40]!r}."}
            self._answer(HTTPStatus.BAD_REQUEST, bad, close=True)
            return None
        return int(length)

    def _score(self, length: int) -> None:
        body = self._read_body(length)
        if len(body) < length:
            late = {"error": f"The request body did not arrive within {self.endpoints.limits.read_timeout_s:g}s."}
            self._answer(HTTPStatus.REQUEST_TIMEOUT, late, close=True, unread=length - len(body))
            return
        try:
            payload = json.loads(body.decode("utf-8"))
        except RecursionError:
            self._answer(HTTPStatus.BAD_REQUEST, {"error": "The request body is JSON nested too deeply."})
            return
        except (UnicodeDecodeError, ValueError) as error:
            self._answer(HTTPStatus.BAD_REQUEST, {"error": f"The request body is not valid JSON: {error}"})
            return
        del body
        self._answer(*self.endpoints.score(payload))

    def _read_body(self, length: int) -> bytes:
        """Up to ``length`` bytes received within ``read_timeout_s`` in total; fewer when the client is too slow."""
        self.reader.deadline = time.monotonic() + self.endpoints.limits.read_timeout_s
        parts: list[bytes] = []
        received = 0
        try:
            while received < length:
                chunk = self.rfile.read1(min(length - received, 1 << 20))
                if not chunk:
                    break
                parts.append(chunk)
                received += len(chunk)
        except OSError:  # timeouts and resets: the caller answers 408
            pass
        finally:
            self._headers_read()
        return b"".join(parts)

    def _answer(
        self, status: int, answer: dict[str, Any], close: bool = False, retry_after: bool = False, unread: int = 0
    ) -> None:
        """Send ``answer`` as JSON; with ``close``, end the connection, first discarding ``unread`` body bytes."""
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
            return
        if close and unread > 0:
            self._linger(unread)

    def _linger(self, unread: int) -> None:
        """Half-close, then discard up to ``unread`` bytes for :data:`LINGER_S` at most.

        Closing a socket with unread bytes resets the connection, and a reset can reach the client
        before it has read the answer; discarding them first lets the close be an ordinary one.
        """
        self.reader.deadline = time.monotonic() + LINGER_S
        try:
            self.connection.shutdown(socket.SHUT_WR)
            while unread > 0:
                discarded = len(self.rfile.read1(min(unread, 1 << 20)))
                if not discarded:
                    return
                unread -= discarded
        except OSError:
            return

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("%s - %s", self.address_string(), format % args)


def make_handler(
    limits: ServerLimits, health: Callable[[], dict[str, Any]], score: Callable[[Mapping[str, Any]], Answer]
) -> type[RequestHandler]:
    """A :class:`RequestHandler` subclass serving ``GET /health`` and ``POST /score`` within ``limits``."""
    endpoints = Endpoints(limits, health, score, Admission(limits.max_concurrent, limits.max_queued))
    # ``timeout`` bounds each read and write; the header and the body also have a bound over all reads.
    return type("Handler", (RequestHandler,), {"endpoints": endpoints, "timeout": limits.read_timeout_s})
