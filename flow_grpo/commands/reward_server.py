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
from pathlib import Path

from absl import flags

from flow_grpo.command_flags import InputValueError, parse_flags
from flow_grpo.commands.errors import command_main, input_errors
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
    """Parse ``--options``: inline JSON or the path of a JSON file, mapping scorer -> options dict.

    Raises:
        InputValueError: a file that cannot be read, text that is not JSON, or JSON of another shape.
    """
    source = "--options"
    if os.path.isfile(text):
        source = f"--options file {text}"
        try:
            text = Path(text).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise InputValueError(f"{source} cannot be read ({error}); give a UTF-8 JSON file") from None
    example = '{"ocr": {"engine": "easyocr"}}'
    try:
        options = json.loads(text)
    except json.JSONDecodeError as error:
        raise InputValueError(f"{source} is neither a JSON object nor a JSON file ({error}); write e.g. '{example}'") from None
    if not isinstance(options, dict) or not all(isinstance(value, dict) for value in options.values()):
        raise InputValueError(f"{source} must map scorer names to option objects; write e.g. '{example}'")
    return options


def parse_devices(text: str) -> list[str]:
    """The ``--devices`` entries (none: ``cuda`` when available, else ``cpu``), each checked against this machine.

    Raises:
        InputValueError: a malformed device name, or a CUDA device this machine does not have.
    """
    import torch

    devices = [name.strip() for name in text.split(",") if name.strip()]
    for name in devices:
        try:
            device = torch.device(name)
        except RuntimeError:
            raise InputValueError(f"--devices: {name!r} is not a device name; give e.g. cpu, cuda or cuda:0,cuda:1") from None
        if device.type != "cuda":
            continue
        count = _cuda_devices()
        if count == 0:
            raise InputValueError(f"--devices: {name} is a CUDA device but this machine has none; pass --devices cpu")
        if device.index is not None and device.index >= count:
            raise InputValueError(f"--devices: {name} does not exist; this machine has cuda:0 to cuda:{count - 1}")
    return devices or ["cuda" if _cuda_devices() else "cpu"]


def _cuda_devices() -> int:
    """How many CUDA devices this process sees (0 without CUDA)."""
    import torch

    return torch.cuda.device_count()


def check_port_free(host: str, port: int) -> None:
    """Fail with a one-line error when ``host:port`` cannot be bound (before any model loads).

    Raises:
        InputValueError: the port is taken, or the host is not an address of this machine.
    """
    if port == 0:
        return
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        # As the server binds: with SO_REUSEADDR, only a port someone listens on is taken.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as error:
            raise bind_error(host, port, error) from None


def bind_error(host: str, port: int, error: OSError) -> InputValueError:
    """The one-line error of a failed bind: a port in use, or an address that is not this machine's."""
    if error.errno == errno.EADDRINUSE:
        return InputValueError(
            f"port {port} on {host} is already in use; stop the server on it, or pass another --port (0 picks one)"
        )
    return InputValueError(f"cannot bind {host}:{port} ({error.strerror or error}); pass an address of this machine as --host")


def _limits(args: flags.FlagValues) -> ServerLimits:
    """The server limits of the flags; one out of range is an `InputValueError` naming it."""
    with input_errors(ValueError):
        return ServerLimits(
            max_batch=args.max_batch,
            max_wait_ms=args.max_wait_ms,
            max_concurrent=args.max_concurrent,
            max_queued=args.max_queued,
            max_request_bytes=int(args.max_request_mb * 1024 * 1024),
            max_pixels=args.max_pixels,
            read_timeout_s=args.read_timeout_s,
            score_timeout_s=args.score_timeout_s,
        )


@command_main()
def main(argv: list[str] | None = None) -> None:
    """Build the scorers and serve until interrupted (`argv`: the flags, default `sys.argv[1:]`).

    Every mistake in the flags (a scorer name, ``--devices``, ``--options``, a limit, ``--log_level``,
    the address) is one ``error:`` line and exit code 2 before any scorer loads.
    """
    args = parse_flags(_FLAGS, argv, __doc__, "flow-grpo-reward-server")
    level = args.log_level.upper()
    if level not in logging.getLevelNamesMapping():
        raise InputValueError(f"--log_level {args.log_level!r} is not a logging level; use DEBUG, INFO, WARNING or ERROR")
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    from accelerate import PartialState

    PartialState()  # library modules log through accelerate, which needs its state
    from flow_grpo.reward_server.server import RewardServer, build_replicas, check_scorer_names

    names = [name.strip() for name in args.scorers.split(",") if name.strip()]
    options = load_options(args.options)
    check_scorer_names(names, options)
    devices = parse_devices(args.devices)
    limits = _limits(args)
    check_port_free(args.host, args.port)
    # A scorer's factory reports a missing package, weights file or model it cannot fetch with these.
    with input_errors(ImportError, ValueError, OSError, RuntimeError):
        replicas = build_replicas(names, devices, options)
    try:
        server = RewardServer(replicas, host=args.host, port=args.port, limits=limits, devices=devices)
    except OSError as error:  # the port was taken while the scorers loaded
        raise bind_error(args.host, args.port, error) from None
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
