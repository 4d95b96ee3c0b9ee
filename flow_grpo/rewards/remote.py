"""Rewards scored by a reward server over HTTP (GenEval, OCR, VLM judges, or any hosted reward).

Some scorers need their own environment (an object detector stack, an OCR engine, a served VLM).
They run in ``scripts/reward_server.py`` and the training job reaches them with a client reward.

Wire protocol (JSON only; nothing received is ever unpickled or evaluated):

- ``GET /health`` -> ``{"status": "ok", "protocol": 1, "scorers": [names], "limits": {"max_batch": B,
  "max_request_bytes": L, "max_pixels": P, ...}, ...}`` (``limits``: the most images, bytes and
  decoded pixels one request may carry)
- ``POST /score`` with body::

      {"protocol": 1, "scorer": "<name>", "image_format": "png" | "raw", "height": H, "width": W,
       "images": ["<base64>", ...], "prompts": ["...", ...], "metadata": [{...}, ...]}

  ``png``: each image is a base64 PNG (RGB, 8 bit). ``raw``: each image is the base64 of its
  ``H * W * 3`` uint8 bytes in ``(H, W, RGB)`` order (no compression; the default for a server on
  this machine, ``image_format = "auto"``, since PNG encoding costs more than a loopback copy).
  Answer ``200`` with ``{"scores": [float, ...]}`` (one finite number per image) and, for a scorer
  with per-image details, ``"details": {"<detail>": [float or null, ...], ...}`` (null where the
  detail does not apply), or a 4xx/5xx status with ``{"error": "<message>"}``.

Client rewards: ``remote`` (asks for ``reward_options.remote.scorer``) and the named rewards of
:data:`NAMED_REMOTE_REWARDS`: ``geneval`` (the public training score), ``geneval_strict`` and
``geneval_correct`` (the strict and the official 0/1 correctness as the score; all three ask the
``geneval`` scorer and return its details), ``ocr``, ``ocr_exact``, ``unifiedreward`` and ``deqa``, which ask
for the scorer of their own name. Their options are :data:`REMOTE_DEFAULTS`. A batch goes in as few requests as the server's ``/health`` limits allow
(at most ``batch_size`` images each); a 413 answer halves the request size.

Errors (all :class:`RemoteRewardError`): :class:`RemoteRewardUnreachableError` (connection refused or
dropped on every attempt), :class:`RemoteRewardTimeoutError` (the exchange did not complete within
``timeout`` seconds on every attempt; the deadline covers connect, send and receive together, so a
server that trickles its answer cannot stretch it), :class:`RemoteRewardHTTPError` (a non-200 status),
:class:`RemoteRewardBadReplyError` (not JSON, no ``scores``, wrong length, non-finite or non-numeric
values). Connection failures,
timeouts and statuses 429/500/502/503/504 are retried ``max_retries`` times, waiting ``backoff``,
``2 * backoff``, ... seconds; other errors are raised at once. So a call fails after at most
``(max_retries + 1) * timeout + backoff * (2 ** max_retries - 1)`` seconds per request.
"""

from __future__ import annotations

import http.client
import json
import math
import time
import urllib.parse
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from flow_grpo.command_flags import InputValueError, UserInputError
from flow_grpo.rewards.http_exchange import MAX_REPLY_BYTES, exchange
from flow_grpo.rewards.library_logging import get_logger
from flow_grpo.rewards.options import chunk_slices, parse_options
from flow_grpo.rewards.registry import RewardFn, register_reward
from flow_grpo.rewards.score_details import GENEVAL_DETAILS, SCORE_KEY
from flow_grpo.rewards.transport import IMAGE_FORMATS, PROTOCOL_VERSION, encode_images, is_loopback_host

__all__ = [
    "CLIENT_IMAGE_FORMATS",
    "NAMED_REMOTE_REWARDS",
    "REMOTE_DEFAULTS",
    "RemoteReward",
    "RemoteRewardBadReplyError",
    "RemoteRewardError",
    "RemoteRewardHTTPError",
    "RemoteRewardStartError",
    "RemoteRewardTimeoutError",
    "RemoteRewardUnreachableError",
    "make_remote_reward",
]

logger = get_logger(__name__)

CLIENT_IMAGE_FORMATS = ("auto", *IMAGE_FORMATS)
"""Values of the ``image_format`` option: ``"auto"`` = raw for a loopback server, PNG otherwise."""

_NAMED_SCORERS: dict[str, tuple[str, tuple[str, ...], str]] = {
    "geneval": ("geneval", GENEVAL_DETAILS, ""),
    "geneval_strict": ("geneval", GENEVAL_DETAILS, "strict"),
    "geneval_correct": ("geneval", GENEVAL_DETAILS, "correct"),
    "ocr": ("ocr", (), ""),
    "ocr_exact": ("ocr_exact", (), ""),
    "unifiedreward": ("unifiedreward", (), ""),
    "deqa": ("deqa", (), ""),
}
"""Named client reward -> (server scorer, its detail names, the detail used as the score or "")."""

NAMED_REMOTE_REWARDS = tuple(_NAMED_SCORERS)
"""Client rewards with a fixed server scorer (see the module docstring)."""

REMOTE_DEFAULTS: dict[str, Any] = {
    "url": "http://127.0.0.1:18085",
    "scorer": "",
    "timeout": 120.0,
    "max_retries": 2,
    "backoff": 1.0,
    "batch_size": 64,
    "image_format": "auto",
    "check_health": True,
}
"""Options of every remote reward (mirrored in ``config/base.py``)."""

_RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})


class RemoteRewardError(RuntimeError):
    """A remote reward could not produce scores; the message says what to check."""


class RemoteRewardUnreachableError(RemoteRewardError):
    """The server refused or dropped the connection on every attempt."""


class RemoteRewardTimeoutError(RemoteRewardError):
    """The server did not answer within the timeout on every attempt."""


class RemoteRewardHTTPError(RemoteRewardError):
    """The server answered with a status other than 200."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class RemoteRewardBadReplyError(RemoteRewardError):
    """The server answered 200 with a body that is not a valid score list for the batch."""


class RemoteRewardStartError(UserInputError, RemoteRewardError):
    """The check when the reward is built failed (server down, or not hosting the scorer): the user's to fix.

    Its cause (``__cause__``) is the :class:`RemoteRewardError` the check raised.
    """


class RemoteReward:
    """Client of a reward server: ``reward(images, prompts, metadata) -> float32 (N,) CPU``.

    Sends the batch in as few requests as the server's limits allow (see the module docstring for
    the protocol, the total deadline per request, retries and errors).
    """

    def __init__(
        self,
        url: str,
        scorer: str,
        *,
        timeout: float = 120.0,
        max_retries: int = 2,
        backoff: float = 1.0,
        batch_size: int = 64,
        image_format: str = "auto",
        reward_name: str = "remote",
        detail_names: Sequence[str] = (),
        score_detail: str = "",
    ) -> None:
        """Args: see :data:`REMOTE_DEFAULTS`; ``reward_name`` names the config entry in messages.

        ``detail_names``: the per-image details the scorer answers with (the reward then returns
        ``{"score": (N,), detail: (N,)}``); ``score_detail``: one of them to use as the score.
        """
        setting = f"reward_options.{reward_name}"
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise InputValueError(f"{setting}.url is {url!r}; give an http(s) URL like 'http://127.0.0.1:18085'.")
        if not scorer:
            raise InputValueError(f"{setting}.scorer is empty; set it to the name of a scorer the server hosts.")
        if not timeout > 0:
            raise InputValueError(f"{setting}.timeout is {timeout}; give a positive number of seconds.")
        if max_retries < 0:
            raise InputValueError(f"{setting}.max_retries is {max_retries}; give 0 or more.")
        if backoff < 0:
            raise InputValueError(f"{setting}.backoff is {backoff}; give 0 or more seconds.")
        if batch_size < 1:
            raise InputValueError(f"{setting}.batch_size is {batch_size}; give 1 or more.")
        if image_format not in CLIENT_IMAGE_FORMATS:
            raise InputValueError(f"{setting}.image_format is {image_format!r}; give one of {CLIENT_IMAGE_FORMATS}.")
        if score_detail and score_detail not in detail_names:
            raise InputValueError(f"{setting}.score_detail is {score_detail!r}; give one of the details {list(detail_names)}.")
        self.url = url.rstrip("/")
        self.scorer = scorer
        self.timeout = float(timeout)
        self.max_retries = int(max_retries)
        self.backoff = float(backoff)
        self.batch_size = int(batch_size)
        self.loopback = is_loopback_host(parsed.hostname)
        self.image_format = ("raw" if self.loopback else "png") if image_format == "auto" else image_format
        self.reward_name = reward_name
        self.detail_names = tuple(detail_names)
        self.score_detail = score_detail
        self.max_request_bytes: int | None = None
        """The server's body limit, once :meth:`check` has read it from ``/health``."""
        self.max_pixels: int | None = None
        """The server's pixels per request, once :meth:`check` has read it from ``/health``."""

    def __repr__(self) -> str:
        return f"RemoteReward(url={self.url!r}, scorer={self.scorer!r})"

    def health(self) -> dict[str, Any]:
        """``GET /health``; returns the server's reply dict (with its ``"scorers"`` list)."""
        body = self._request("GET", "/health", None)
        reply = self._parse_json(body)
        if not isinstance(reply.get("scorers"), list):
            raise RemoteRewardBadReplyError(
                f"Reward server at {self.url} sent a /health reply without a 'scorers' list."
            )
        return reply

    def check(self) -> None:
        """Fail early if the server is down or does not host ``scorer``; adopt the server's request limits."""
        reply = self.health()
        hosted = reply["scorers"]
        if self.scorer not in hosted:
            raise RemoteRewardError(
                f"The reward server at {self.url} does not host scorer {self.scorer!r} (it hosts {hosted}); "
                f"restart it with `--scorers {self.scorer}` or fix reward_options.{self.reward_name}."
            )
        limits = reply.get("limits")
        if isinstance(limits, dict):
            max_batch, max_bytes = limits.get("max_batch"), limits.get("max_request_bytes")
            max_pixels = limits.get("max_pixels")
            if isinstance(max_batch, int) and max_batch >= 1:
                self.batch_size = min(self.batch_size, max_batch)
            if isinstance(max_bytes, int) and max_bytes >= 1:
                self.max_request_bytes = max_bytes
            if isinstance(max_pixels, int) and max_pixels >= 1:
                self.max_pixels = max_pixels

    def images_per_request(self, height: int, width: int) -> int:
        """Most images of ``height x width`` one request carries: ``batch_size``, the byte and the pixel limit."""
        count = self.batch_size
        if self.max_request_bytes is not None:
            # base64 of the raw bytes (PNG of 8-bit images is at most ~0.1 % larger), plus 4 KiB per image for
            # its prompt and metadata and 64 KiB for the rest of the request.
            per_image = math.ceil(height * width * 3 * 1.01 * 4 / 3) + 4096
            count = min(count, (self.max_request_bytes - 65536) // per_image)
        if self.max_pixels is not None:
            count = min(count, self.max_pixels // (height * width))
        return max(1, count)

    def __call__(
        self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[Mapping[str, Any]]
    ) -> torch.Tensor | dict[str, torch.Tensor]:
        """Score a batch remotely.

        Args:
            images: float ``(N, 3, H, W)`` in ``[0, 1]`` or uint8, any device.
            prompts: ``N`` prompts.
            metadata: ``N`` JSON-serialisable dicts (e.g. GenEval ``tag`` / ``include`` / ``exclude``).

        Returns:
            float32 ``(N,)`` on the CPU; with ``detail_names``, ``{"score": (N,), detail: (N,), ...}``
            (NaN where a detail does not apply).
        """
        num = images.shape[0]
        if len(prompts) != num or len(metadata) != num:
            raise ValueError(f"Got {num} images, {len(prompts)} prompts and {len(metadata)} metadata dicts.")
        rows: list[list[float]] = []  # per image: its score, then its details in detail_names order
        for part in chunk_slices(num, self.images_per_request(images.shape[2], images.shape[3])):
            rows.extend(self._score_chunk(images[part], list(prompts[part]), list(metadata[part])))
        columns = torch.tensor(rows, dtype=torch.float32).reshape(num, 1 + len(self.detail_names)).T
        if not self.detail_names:
            return columns[0]
        result = {SCORE_KEY: columns[0], **dict(zip(self.detail_names, columns[1:], strict=True))}
        if self.score_detail:
            result[SCORE_KEY] = result[self.score_detail].clone()
        return result

    def _score_chunk(
        self, images: torch.Tensor, prompts: list[str], metadata: list[Mapping[str, Any]]
    ) -> list[list[float]]:
        payload = {"protocol": PROTOCOL_VERSION, "scorer": self.scorer, **encode_images(images, self.image_format)}
        payload["prompts"] = prompts
        payload["metadata"] = [dict(m) for m in metadata]
        try:
            body = json.dumps(payload, allow_nan=False).encode("utf-8")
        except (TypeError, ValueError) as error:
            raise ValueError(
                f"The prompts and metadata sent to the reward server must be JSON-serialisable: {error}"
            ) from None
        del payload
        num = len(prompts)
        too_large: RemoteRewardError | None = None
        if self.max_request_bytes is not None and len(body) > self.max_request_bytes and num > 1:
            too_large = RemoteRewardError(f"A body of {len(body)} bytes exceeds the server's {self.max_request_bytes}")
        else:
            try:
                reply = self._parse_json(self._request("POST", "/score", body))
            except RemoteRewardHTTPError as error:
                if error.status != 413 or num == 1:
                    raise
                too_large = error
        if too_large is not None:
            half = num // 2
            self.batch_size = max(1, min(self.batch_size, half))
            logger.warning(f"{too_large}; sending {half} images per request", main_process_only=False)
            return self._score_chunk(images[:half], prompts[:half], metadata[:half]) + self._score_chunk(
                images[half:], prompts[half:], metadata[half:]
            )
        scores = reply.get("scores")
        if not isinstance(scores, list):
            raise RemoteRewardBadReplyError(
                f"Reward server at {self.url} sent a reply without a 'scores' list: {_preview(reply)}"
            )
        if len(scores) != num:
            raise RemoteRewardBadReplyError(
                f"Reward server at {self.url} sent {len(scores)} scores for {num} images (scorer {self.scorer!r})."
            )
        values = [_finite_float(value) for value in scores]
        for value, number in zip(scores, values, strict=True):
            if number is None:
                raise RemoteRewardBadReplyError(
                    f"Reward server at {self.url} sent a score that is not a finite number (as a float): "
                    f"{_preview(value)} (scorer {self.scorer!r})."
                )
        details = self._details(reply, num)
        return [[number, *(column[i] for column in details)] for i, number in enumerate(values)]

    def _details(self, reply: Mapping[str, Any], num: int) -> list[list[float]]:
        """The declared details of a reply, one list of ``num`` floats each (null -> NaN)."""
        if not self.detail_names:
            return []
        details = reply.get("details")
        missing = [name for name in self.detail_names if not isinstance(details, dict) or name not in details]
        if missing:
            raise RemoteRewardBadReplyError(
                f"Reward server at {self.url} sent no details {missing} for scorer {self.scorer!r}; "
                "restart the server with this version of the code."
            )
        columns = []
        for name in self.detail_names:
            values = details[name] if isinstance(details[name], list) else []
            numbers = [float("nan") if v is None else _finite_float(v) for v in values]
            if len(numbers) != num or any(number is None for number in numbers):
                raise RemoteRewardBadReplyError(
                    f"Reward server at {self.url} sent detail {name!r} that is not {num} finite floats or nulls."
                )
            columns.append(numbers)
        return columns

    def _parse_json(self, body: bytes) -> dict[str, Any]:
        def reject_constant(name: str) -> None:
            raise ValueError(f"non-finite number {name}")

        try:
            reply = json.loads(body.decode("utf-8"), parse_constant=reject_constant)
        except (UnicodeDecodeError, ValueError, RecursionError) as error:
            raise RemoteRewardBadReplyError(
                f"Reward server at {self.url} sent a reply that is not valid JSON ({error}): {body[:200]!r}"
            ) from None
        if not isinstance(reply, dict):
            raise RemoteRewardBadReplyError(
                f"Reward server at {self.url} sent JSON that is not an object: {_preview(reply)}"
            )
        return reply

    def _request(self, method: str, path: str, body: bytes | None) -> bytes:
        """One HTTP exchange with bounded retries; returns the body of a 200 answer."""
        attempts = self.max_retries + 1
        start = time.monotonic()
        last_error: RemoteRewardError | None = None
        for attempt in range(attempts):
            if attempt:
                delay = self.backoff * 2 ** (attempt - 1)
                logger.warning(
                    f"Reward server {self.url}{path}: {last_error}; retry {attempt}/{self.max_retries} in {delay:.1f}s",
                    main_process_only=False,
                )
                time.sleep(delay)
            try:
                status, data = exchange(self.url, method, path, body, timeout=self.timeout, direct=self.loopback)
            except TimeoutError as error:
                last_error = self._timeout_error(path, error)
                continue
            except (ConnectionError, http.client.RemoteDisconnected, http.client.IncompleteRead) as error:
                # Dropped or reset connections, answers cut short: worth another try.
                last_error = self._unreachable_error(path, error)
                continue
            except http.client.HTTPException as error:
                # Bytes that are not HTTP at all: most likely another service on that port.
                raise RemoteRewardBadReplyError(
                    f"The server at {self.url}{path} did not answer with valid HTTP ({type(error).__name__}: "
                    f"{_preview(str(error))}); is reward_options.{self.reward_name}.url the reward server?"
                ) from None
            except OSError as error:
                last_error = self._unreachable_error(path, error)
                continue
            if status == 200:
                if len(data) > MAX_REPLY_BYTES:
                    raise RemoteRewardBadReplyError(
                        f"Reward server at {self.url} sent a reply over {MAX_REPLY_BYTES} bytes."
                    )
                return data
            last_error = RemoteRewardHTTPError(
                f"Reward server at {self.url}{path} answered HTTP {status} for scorer {self.scorer!r}: "
                f"{_error_message(status, data)}",
                status,
            )
            if status not in _RETRY_STATUSES:
                raise last_error
        elapsed = time.monotonic() - start
        assert last_error is not None
        raise type(last_error)(
            f"{last_error} (gave up after {attempts} attempt(s) in {elapsed:.1f}s; "
            f"reward_options.{self.reward_name}.max_retries = {self.max_retries})",
            *([last_error.status] if isinstance(last_error, RemoteRewardHTTPError) else []),
        )

    def _timeout_error(self, path: str, error: BaseException) -> RemoteRewardTimeoutError:
        return RemoteRewardTimeoutError(
            f"Reward server at {self.url}{path} did not answer within {self.timeout:g}s ({error}); raise "
            f"reward_options.{self.reward_name}.timeout or check the server's load"
        )

    def _unreachable_error(self, path: str, reason: object) -> RemoteRewardUnreachableError:
        return RemoteRewardUnreachableError(
            f"Reward server at {self.url}{path} is unreachable ({reason}); start it with "
            f"`python scripts/reward_server.py --scorers {self.scorer} --port <port>` or fix "
            f"reward_options.{self.reward_name}.url"
        )


def _error_message(status: int, body: bytes) -> str:
    """The ``"error"`` field of an error answer, else the start of its body."""
    try:
        parsed = json.loads(body[: 64 * 1024].decode("utf-8"))
        if isinstance(parsed, dict) and isinstance(parsed.get("error"), str):
            return parsed["error"]
    except (UnicodeDecodeError, ValueError, RecursionError):
        pass
    return body[:300].decode("utf-8", errors="replace") or f"HTTP {status}"


def _finite_float(value: object) -> float | None:
    """A JSON number as a finite float; ``None`` for anything else (a bool, a string, an int too large for a float)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:  # JSON integers have no size limit, floats do
        return None
    return number if math.isfinite(number) else None


def _preview(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 200 else text[:200] + "..."


def make_remote_reward(reward_name: str, device: torch.device, options: Mapping[str, Any]) -> RewardFn:
    """Build the client reward ``reward_name`` from its options (see :data:`REMOTE_DEFAULTS`).

    The scorer asked for is ``options["scorer"]``, or the named reward's scorer (see
    :data:`NAMED_REMOTE_REWARDS`). With ``check_health`` the server is asked at once whether it hosts
    that scorer.
    """
    opts = parse_options(reward_name, options, REMOTE_DEFAULTS)
    default_scorer, detail_names, score_detail = _NAMED_SCORERS.get(reward_name, ("", (), ""))
    scorer = opts["scorer"] or default_scorer
    client = RemoteReward(
        opts["url"],
        scorer,
        timeout=opts["timeout"],
        max_retries=opts["max_retries"],
        backoff=opts["backoff"],
        batch_size=opts["batch_size"],
        image_format=opts["image_format"],
        reward_name=reward_name,
        detail_names=detail_names,
        score_detail=score_detail,
    )
    if opts["check_health"]:
        try:
            client.check()
        except RemoteRewardError as error:
            raise RemoteRewardStartError(str(error)) from error
    return client


def _register(name: str) -> None:
    def factory(device: torch.device, options: Mapping[str, Any]) -> RewardFn:
        return make_remote_reward(name, device, options)

    factory.__doc__ = f"Client reward {name!r}: scores images on a reward server (see flow_grpo.rewards.remote)."
    factory.__name__ = f"make_{name}_remote"
    factory.remote = True  # type: ignore[attr-defined]  # the server refuses to host client rewards
    register_reward(name)(factory)


for _name in ("remote", *NAMED_REMOTE_REWARDS):
    _register(_name)
