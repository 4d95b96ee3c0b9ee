r"""Reference reward server: hosts rewards for training jobs over HTTP (JSON protocol, no pickle).

The `flow-grpo-reward-server` command; from a checkout, `python scripts/reward_server.py` with the same flags.

Examples::

    # GenEval and OCR for the geneval_sd3 / ocr_sd3 presets (their default URL is http://127.0.0.1:18085)
    flow-grpo-reward-server --scorers geneval,ocr --port 18085

    # A local reward on a spare GPU, with options
    flow-grpo-reward-server --scorers pickscore --devices cuda:1 \
        --options '{"pickscore": {"dtype": "float16"}}'

    # One replica per GPU, batches of up to 128 images gathered for at most 20 ms
    flow-grpo-reward-server --scorers geneval,ocr --devices cuda:6,cuda:7 --max_batch 128 --max_wait_ms 20

    # A VLM judge served by vLLM on port 8080
    flow-grpo-reward-server --scorers unifiedreward \
        --options '{"unifiedreward": {"base_url": "http://127.0.0.1:8080/v1"}}'

Endpoints: ``GET /health`` and ``POST /score`` (see ``flow_grpo/rewards/remote.py``). The server
binds to 127.0.0.1 by default; bind to another address only on a trusted network, since anyone
who can reach the port can use the hosted models.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import sys
from pathlib import Path
from typing import NoReturn

from absl import flags

from flow_grpo.command_flags import parse_flags
from flow_grpo.reward_server.frontend import ServerLimits

logger = logging.getLogger("reward_server")


_DEFAULT_LIMITS = ServerLimits()
_FLAGS = flags.FlagValues()
flags.DEFINE_string("scorers", None, "Comma-separated scorer names, e.g. geneval,ocr,pickscore.", required=True, flag_values=_FLAGS)
flags.DEFINE_string("host", "127.0.0.1", "Address to bind (default: loopback only).", flag_values=_FLAGS)
flags.DEFINE_integer("port", 18085, "Port to bind; 0 picks a free one.", lower_bound=0, flag_values=_FLAGS)
flags.DEFINE_string(
    "devices",
    "",
    "Comma-separated devices, one replica of every scorer per entry (e.g. cuda:0,cuda:1); empty = cuda if available, else cpu.",
    flag_values=_FLAGS,
)
flags.DEFINE_string(
    "options", "{}", 'Scorer options as JSON, inline or the path of a .json file: {"scorer": {"key": value}}.', flag_values=_FLAGS
)
flags.DEFINE_integer("max_batch", _DEFAULT_LIMITS.max_batch, "Most images per scorer call and per request.", flag_values=_FLAGS)
flags.DEFINE_float(
    "max_wait_ms",
    _DEFAULT_LIMITS.max_wait_ms,
    "Longest wait of the oldest queued request for companions to fill a batch.",
    flag_values=_FLAGS,
)
flags.DEFINE_integer(
    "max_concurrent",
    _DEFAULT_LIMITS.max_concurrent,
    "Requests read and scored at once; up to --max_queued more wait for a slot.",
    flag_values=_FLAGS,
)
flags.DEFINE_integer(
    "max_queued",
    _DEFAULT_LIMITS.max_queued,
    "Requests waiting up to --read_timeout_s for a slot; beyond them a request gets 503 with Retry-After at once.",
    flag_values=_FLAGS,
)
flags.DEFINE_float(
    "max_request_mb",
    0.0,
    "Largest accepted request body in MB; 0 = max_batch raw 512x512 images in base64 with 25% headroom.",
    flag_values=_FLAGS,
)
flags.DEFINE_integer(
    "max_pixels",
    _DEFAULT_LIMITS.max_pixels,
    "Most pixels one request decodes (images * height * width); a request decodes into at most 15 bytes per pixel.",
    flag_values=_FLAGS,
)
flags.DEFINE_float(
    "read_timeout_s",
    _DEFAULT_LIMITS.read_timeout_s,
    "Longest time to receive a request's headers, then its body (and to wait for a slot).",
    flag_values=_FLAGS,
)
flags.DEFINE_float(
    "score_timeout_s",
    _DEFAULT_LIMITS.score_timeout_s,
    "Longest time a request waits for its scores (then HTTP 504).",
    flag_values=_FLAGS,
)
flags.DEFINE_string("log_level", "INFO", "Logging level (DEBUG logs every request).", flag_values=_FLAGS)
flags.DEFINE_alias("device", "devices", flag_values=_FLAGS)


def load_options(text: str) -> dict:
    """Parse ``--options``: inline JSON or a path to a JSON file, mapping scorer -> options dict."""
    if os.path.isfile(text):
        text = Path(text).read_text(encoding="utf-8")
    try:
        options = json.loads(text)
    except json.JSONDecodeError as error:
        raise SystemExit(f"--options is neither a JSON object nor a JSON file: {error}") from None
    if not isinstance(options, dict) or not all(isinstance(v, dict) for v in options.values()):
        raise SystemExit('--options must map scorer names to option objects, e.g. {"ocr": {"engine": "easyocr"}}.')
    return options


def fail(problem: str, remedy: str) -> NoReturn:
    """Print ``error: <problem>; <remedy>`` on stderr and exit with code 2 (a mistake the user can fix)."""
    print(f"error: {problem}; {remedy}", file=sys.stderr)
    raise SystemExit(2)


def check_port_free(host: str, port: int) -> None:
    """Exit with a one-line error when ``host:port`` cannot be bound (before any model loads)."""
    if port == 0:
        return
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        # As the server binds: with SO_REUSEADDR, only a port someone listens on is taken.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as error:
            _fail_bind(host, port, error)


def _fail_bind(host: str, port: int, error: OSError) -> NoReturn:
    if error.errno == errno.EADDRINUSE:
        fail(f"port {port} on {host} is already in use", "stop the server on it, or pass another --port (0 picks one)")
    fail(f"cannot bind {host}:{port} ({error.strerror or error})", "pass an address of this machine as --host")


def main(argv: list[str] | None = None) -> None:
    """Build the scorers and serve until interrupted (`argv`: the flags, default `sys.argv[1:]`)."""
    args = parse_flags(_FLAGS, argv, __doc__, "flow-grpo-reward-server")
    log_format = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=args.log_level.upper(), format=log_format, force=True)
    import torch
    from accelerate import PartialState

    PartialState()  # library modules log through accelerate, which needs its state
    from flow_grpo.reward_server.server import RewardServer, build_replicas

    names = [name.strip() for name in args.scorers.split(",") if name.strip()]
    devices = [d.strip() for d in args.devices.split(",") if d.strip()] or [
        "cuda" if torch.cuda.is_available() else "cpu"
    ]
    check_port_free(args.host, args.port)
    try:
        limits = ServerLimits(
            max_batch=args.max_batch,
            max_wait_ms=args.max_wait_ms,
            max_concurrent=args.max_concurrent,
            max_queued=args.max_queued,
            max_request_bytes=int(args.max_request_mb * 1024 * 1024),
            max_pixels=args.max_pixels,
            read_timeout_s=args.read_timeout_s,
            score_timeout_s=args.score_timeout_s,
        )
        for device in devices:
            torch.device(device)  # a malformed device name fails here, before any model loads
        options = load_options(args.options)
        replicas = build_replicas(names, devices, options)
    except (ImportError, ValueError, OSError, RuntimeError) as error:
        raise SystemExit(f"Could not start the reward server: {error}") from None
    try:
        server = RewardServer(replicas, host=args.host, port=args.port, limits=limits, devices=devices)
    except OSError as error:  # the port was taken while the scorers loaded
        _fail_bind(args.host, args.port, error)
    logger.info(
        "Serving %s on %s (devices %s, max_batch %d, max_wait_ms %g, body limit %d bytes); health: %s/health",
        names,
        server.url,
        ",".join(devices),
        limits.max_batch,
        limits.max_wait_ms,
        limits.max_request_bytes,
        server.url,
    )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        logger.info("Stopping")
    finally:
        server.close()


if __name__ == "__main__":
    main()
