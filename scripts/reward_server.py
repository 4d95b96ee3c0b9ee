"""Reference reward server: hosts rewards for training jobs over HTTP (JSON protocol, no pickle).

Examples::

    # GenEval and OCR for the geneval_sd3 / ocr_sd3 presets (their default URL is http://127.0.0.1:18085)
    python scripts/reward_server.py --scorers geneval,ocr --port 18085

    # A local reward on a spare GPU, with options
    python scripts/reward_server.py --scorers pickscore --devices cuda:1 \
        --options '{"pickscore": {"dtype": "float16"}}'

    # One replica per GPU, batches of up to 128 images gathered for at most 20 ms
    python scripts/reward_server.py --scorers geneval,ocr --devices cuda:6,cuda:7 --max_batch 128 --max_wait_ms 20

    # A VLM judge served by vLLM on port 8080
    python scripts/reward_server.py --scorers unifiedreward \
        --options '{"unifiedreward": {"base_url": "http://127.0.0.1:8080/v1"}}'

Endpoints: ``GET /health`` and ``POST /score`` (see ``flow_grpo/rewards/remote.py``). The server
binds to 127.0.0.1 by default; bind to another address only on a trusted network, since anyone
who can reach the port can use the hosted models.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

try:
    import flow_grpo  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flow_grpo.reward_server.frontend import ServerLimits

logger = logging.getLogger("reward_server")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scorers", required=True, help="comma-separated scorer names, e.g. geneval,ocr,pickscore")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    parser.add_argument("--port", type=int, default=18085, help="port to bind; 0 picks a free one")
    parser.add_argument(
        "--devices",
        "--device",
        default="",
        help="comma-separated devices, one replica of every scorer per entry (e.g. cuda:0,cuda:1); "
        "default cuda if available, else cpu",
    )
    parser.add_argument(
        "--options",
        default="{}",
        help='scorer options as JSON, inline or the path of a .json file: {"scorer": {"key": value}}',
    )
    defaults = ServerLimits()
    parser.add_argument(
        "--max_batch",
        "--max-batch",
        type=int,
        default=defaults.max_batch,
        help="most images per scorer call and per request",
    )
    parser.add_argument(
        "--max_wait_ms",
        "--max-wait-ms",
        type=float,
        default=defaults.max_wait_ms,
        help="longest wait of the oldest queued request for companions to fill a batch",
    )
    parser.add_argument(
        "--max_concurrent",
        "--max-concurrent",
        type=int,
        default=defaults.max_concurrent,
        help="requests read and scored at once; more wait up to --read_timeout_s, then get 503",
    )
    parser.add_argument(
        "--max-request-mb",
        type=float,
        default=0.0,
        help="largest accepted request body in MB; 0 = max_batch raw 512x512 images in base64 with 25%% headroom",
    )
    parser.add_argument(
        "--max-pixels", type=int, default=defaults.max_pixels, help="largest accepted image (height * width)"
    )
    parser.add_argument(
        "--read_timeout_s",
        "--read-timeout-s",
        type=float,
        default=defaults.read_timeout_s,
        help="longest time to receive one request body",
    )
    parser.add_argument(
        "--score_timeout_s",
        "--score-timeout-s",
        type=float,
        default=defaults.score_timeout_s,
        help="longest time a request waits for its scores (then HTTP 504)",
    )
    parser.add_argument("--log-level", default="INFO", help="logging level (DEBUG logs every request)")
    return parser.parse_args(argv)


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


def main(argv: list[str] | None = None) -> None:
    """Build the scorers and serve until interrupted."""
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import torch
    from accelerate import PartialState

    PartialState()  # library modules log through accelerate, which needs its state
    from flow_grpo.reward_server.server import RewardServer, build_replicas

    names = [name.strip() for name in args.scorers.split(",") if name.strip()]
    devices = [d.strip() for d in args.devices.split(",") if d.strip()] or [
        "cuda" if torch.cuda.is_available() else "cpu"
    ]
    try:
        limits = ServerLimits(
            max_batch=args.max_batch,
            max_wait_ms=args.max_wait_ms,
            max_concurrent=args.max_concurrent,
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
    server = RewardServer(replicas, host=args.host, port=args.port, limits=limits, devices=devices)
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
