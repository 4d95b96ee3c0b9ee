"""Reference reward server: hosts rewards for training jobs over HTTP (JSON protocol, no pickle).

Examples::

    # GenEval and OCR for the geneval_sd3 / ocr_sd3 presets (their default URL is http://127.0.0.1:18085)
    python scripts/reward_server.py --scorers geneval,ocr --port 18085

    # A local reward on a spare GPU, with options
    python scripts/reward_server.py --scorers pickscore --device cuda:1 \
        --options '{"pickscore": {"dtype": "float16"}}'

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

logger = logging.getLogger("reward_server")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scorers", required=True, help="comma-separated scorer names, e.g. geneval,ocr,pickscore")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    parser.add_argument("--port", type=int, default=18085, help="port to bind; 0 picks a free one")
    parser.add_argument("--device", default="", help="device of the scorer models; default cuda if available, else cpu")
    parser.add_argument(
        "--options",
        default="{}",
        help='scorer options as JSON, inline or the path of a .json file: {"scorer": {"key": value}}',
    )
    parser.add_argument("--max-request-mb", type=float, default=512.0, help="largest accepted request body in MB")
    parser.add_argument("--max-pixels", type=int, default=4096 * 4096, help="largest accepted image (height * width)")
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
    from flow_grpo.reward_server.server import RewardServer, build_scorers

    names = [name.strip() for name in args.scorers.split(",") if name.strip()]
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        scorers = build_scorers(names, device, load_options(args.options))
    except (ImportError, ValueError, OSError) as error:
        raise SystemExit(f"Could not start the reward server: {error}") from None
    server = RewardServer(
        scorers,
        host=args.host,
        port=args.port,
        max_request_bytes=int(args.max_request_mb * 1024 * 1024),
        max_pixels=args.max_pixels,
    )
    logger.info("Serving %s on %s (device %s); health: %s/health", names, server.url, device, server.url)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        logger.info("Stopping")
    finally:
        server.close()


if __name__ == "__main__":
    main()
