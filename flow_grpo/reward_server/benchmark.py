"""Throughput of the reward server against scoring in-process: ``main(argv)`` (``flow-grpo-reward-server-benchmark``).

Starts a reward server in this process (one replica per ``--devices`` entry) and ``--clients``
client processes; each client sends ``--requests`` batches of ``--batch_size`` random 8-bit images
of ``--resolution`` pixels (defaults: the preset's per-process sampling batch and resolution) and
records each request's latency. The same images are then scored in-process by the same scorer
instance on the same device, batch by batch. Prints images/s, p50/p95 request latency, the cost of
PNG against raw transport per image, and as the last line
``server/in-process throughput ratio: X.XX``.

The default scorer is a CLIP image-text similarity of ViT-B/16 size (224 px, patch 16, 12 layers per
tower) with random weights built from its config, so it runs offline and its per-image cost is that
of a real CLIP reward; ``tiny_clip`` is the 32-wide test model and any registered local reward name
(e.g. ``jpeg_compressibility``) also works.
"""

from __future__ import annotations

import importlib.util
import multiprocessing
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from absl import flags

from flow_grpo.command_flags import InputNotFoundError, InputValueError, parse_flags
from flow_grpo.rewards.registry import RewardFn

__all__ = ["ThroughputOptions", "build_benchmark_scorer", "main", "measure_transport", "parse_options", "run"]

BENCHMARK_SCORERS = ("clip_vit_b16", "tiny_clip")
"""Scorers built in code; any registered local reward name is accepted as well."""


def build_benchmark_scorer(name: str, device: torch.device | str, model_batch: int = 64) -> RewardFn:
    """A scorer ``(images (N, 3, H, W) in [0, 1], prompts, metadata) -> float32 (N,)`` on ``device``.

    ``clip_vit_b16``: random-weight CLIP ViT-B/16 image-text similarity; ``tiny_clip``: the test CLIP;
    any other name: the registered local reward with default options. The CLIP scorers run at most
    ``model_batch`` images per model call.
    """
    device = torch.device(device)
    if name not in BENCHMARK_SCORERS:
        from flow_grpo.reward_server.server import build_scorers

        return build_scorers([name], device)[name]
    from transformers import CLIPConfig, CLIPModel

    from flow_grpo.rewards.clip_models import ClipEncoder, ClipSimilarityReward
    from flow_grpo.rewards.preprocess import ImagePreprocess
    from flow_grpo.testing.pipelines import CLIP_MAX_LENGTH, clip_tokenizer
    from flow_grpo.testing.rewards import tiny_clip_model, tiny_clip_processor

    if name == "tiny_clip":
        model, image_size = tiny_clip_model(), 32
    else:
        image_size = 224
        text = {"vocab_size": 514, "max_position_embeddings": CLIP_MAX_LENGTH, "bos_token_id": 0, "eos_token_id": 1}
        config = CLIPConfig(
            text_config={**text, "pad_token_id": 1},
            vision_config={"image_size": image_size, "patch_size": 16},
            projection_dim=512,
        )
        torch.manual_seed(0)
        model = CLIPModel(config).eval()
    preprocess = ImagePreprocess.from_clip_image_processor(tiny_clip_processor(image_size))
    encoder = ClipEncoder(model, clip_tokenizer(), preprocess, device, torch.float32, batch_size=model_batch)
    return ClipSimilarityReward(encoder, scale=1.0)


def _preset_batch(preset: str) -> tuple[int, int]:
    """``(sample.batch_size, sample.resolution)`` of a preset of ``config/grpo.py``."""
    path = Path(__file__).resolve().parents[2] / "config" / "grpo.py"
    spec = importlib.util.spec_from_file_location("flow_grpo_config_grpo", path)
    if spec is None or not path.is_file():
        raise InputNotFoundError(f"{path} not found; give --batch_size and --resolution")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, preset):
        raise InputValueError(f"config/grpo.py has no preset {preset!r}; give a preset of it, or --batch_size and --resolution")
    config = getattr(module, preset)()
    return int(config.sample.batch_size), int(config.sample.resolution)


def _client_images(client: int, request: int, batch_size: int, resolution: int) -> torch.Tensor:
    """The 8-bit images of one request, float ``(B, 3, R, R)`` in [0, 1], identical in every process."""
    generator = np.random.default_rng([client, request])
    pixels = generator.integers(0, 256, size=(batch_size, 3, resolution, resolution), dtype=np.uint8)
    return torch.from_numpy(pixels).float().div_(255.0)


def _prompts(batch_size: int) -> list[str]:
    return [f"a photo of object {i % 3}" for i in range(batch_size)]


def _client(
    index: int, url: str, args: ThroughputOptions, barrier: Any, results: Any
) -> None:  # runs in a client process
    torch.set_num_threads(1)
    from accelerate import PartialState

    from flow_grpo.rewards.remote import RemoteReward

    PartialState()
    client = RemoteReward(url, args.scorer, timeout=600.0, max_retries=0, image_format=args.image_format)
    client.check()
    batches = [_client_images(index, r, args.batch_size, args.resolution) for r in range(args.requests)]
    prompts, metadata = _prompts(args.batch_size), [{}] * args.batch_size
    barrier.wait()
    latencies = []
    for images in batches:
        start = time.perf_counter()
        client(images, prompts, metadata)
        latencies.append(time.perf_counter() - start)
    results.put((index, latencies, time.perf_counter()))


def measure_transport(resolution: int, num_images: int = 4) -> dict[str, float]:
    """Milliseconds per image to encode (client) and decode (server) each image format."""
    from flow_grpo.rewards.transport import decode_images, encode_images

    images = _client_images(0, 0, num_images, resolution)
    costs: dict[str, float] = {}
    for image_format in ("raw", "png"):
        start = time.perf_counter()
        payload = encode_images(images, image_format)
        encoded = time.perf_counter()
        decode_images(payload)
        decoded = time.perf_counter()
        costs[f"{image_format}_encode_ms"] = 1000 * (encoded - start) / num_images
        costs[f"{image_format}_decode_ms"] = 1000 * (decoded - encoded) / num_images
        costs[f"{image_format}_kb"] = sum(len(item) for item in payload["images"]) * 3 / 4 / 1024 / num_images
    return costs


@dataclass(frozen=True)
class ThroughputOptions:
    """What `run` measures (the flags of `main`; also sent to the client processes)."""

    scorer: str = "clip_vit_b16"
    clients: int = 8
    requests: int = 1
    batch_size: int = 8
    resolution: int = 512
    devices: str = "cpu"
    max_batch: int = 64
    max_wait_ms: float = 20.0
    image_format: str = "auto"


_FLAGS = flags.FlagValues()
flags.DEFINE_string("scorer", "clip_vit_b16", f"{' or '.join(BENCHMARK_SCORERS)} or a local reward.", flag_values=_FLAGS)
flags.DEFINE_integer("clients", 8, "Client processes (one per training process).", lower_bound=1, flag_values=_FLAGS)
flags.DEFINE_integer("requests", 1, "Batches each client sends.", lower_bound=1, flag_values=_FLAGS)
flags.DEFINE_string("preset", "geneval_sd3", "config/grpo.py preset giving batch size and resolution.", flag_values=_FLAGS)
flags.DEFINE_integer("batch_size", 0, "Images per request; 0 = the preset's sample.batch_size.", lower_bound=0, flag_values=_FLAGS)
flags.DEFINE_integer("resolution", 0, "Image side in pixels; 0 = the preset's.", lower_bound=0, flag_values=_FLAGS)
flags.DEFINE_string("devices", "cpu", "Comma-separated devices, one scorer replica each.", flag_values=_FLAGS)
flags.DEFINE_integer("max_batch", 64, "Server: most images per scorer call.", lower_bound=1, flag_values=_FLAGS)
flags.DEFINE_float("max_wait_ms", 20.0, "Server: longest wait to fill a batch.", flag_values=_FLAGS)
flags.DEFINE_enum("image_format", "auto", ["auto", "raw", "png"], "Client image encoding.", flag_values=_FLAGS)


def parse_options(argv: list[str] | None = None) -> ThroughputOptions:
    """The options of `argv` (the flags, default `sys.argv[1:]`); sizes left at 0 come from `--preset`."""
    args = parse_flags(_FLAGS, argv, __doc__, "flow-grpo-reward-server-benchmark")
    batch_size, resolution = args.batch_size, args.resolution
    if not batch_size or not resolution:
        preset_batch_size, preset_resolution = _preset_batch(args.preset)
        batch_size, resolution = batch_size or preset_batch_size, resolution or preset_resolution
    return ThroughputOptions(
        scorer=args.scorer,
        clients=args.clients,
        requests=args.requests,
        batch_size=batch_size,
        resolution=resolution,
        devices=args.devices,
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        image_format=args.image_format,
    )


def main(argv: list[str] | None = None) -> int:
    """The `flow-grpo-reward-server-benchmark` command: run the benchmark of the flags, print its table."""
    run(parse_options(argv))
    return 0


def run(args: ThroughputOptions) -> dict[str, float]:
    """Run the benchmark, print its table and return its numbers."""
    from accelerate import PartialState

    from flow_grpo.reward_server.server import RewardServer, ServerLimits

    PartialState()
    devices = [d.strip() for d in args.devices.split(",") if d.strip()]
    # On a CPU a model call of more images is slower per image (caches), so the scorer runs calls of
    # one request's size there, as in-process scoring does: the ratio then measures transport and
    # queueing alone. On a GPU a merged batch runs in one call, which is what batching is for.
    replicas = [
        build_benchmark_scorer(args.scorer, device, args.batch_size if device == "cpu" else 64) for device in devices
    ]
    prompts, metadata = _prompts(args.batch_size), [{}] * args.batch_size
    batches = [
        _client_images(client, request, args.batch_size, args.resolution)
        for client in range(args.clients)
        for request in range(args.requests)
    ]
    num_images = len(batches) * args.batch_size
    reference = replicas[0]
    with torch.no_grad():
        reference(batches[0], prompts, metadata)  # warm-up
        start = time.perf_counter()
        for images in batches:
            reference(images, prompts, metadata)
        if devices[0].startswith("cuda"):
            torch.cuda.synchronize()
        in_process = num_images / (time.perf_counter() - start)

    limits = ServerLimits(max_batch=args.max_batch, max_wait_ms=args.max_wait_ms)
    with RewardServer({args.scorer: replicas}, port=0, limits=limits, devices=devices) as server:
        context = multiprocessing.get_context("spawn")
        barrier, results = context.Barrier(args.clients + 1), context.Queue()
        processes = [
            context.Process(target=_client, args=(i, server.url, args, barrier, results), daemon=True)
            for i in range(args.clients)
        ]
        for process in processes:
            process.start()
        barrier.wait(timeout=600)
        start = time.perf_counter()
        outcomes = [results.get(timeout=1200) for _ in processes]
        for process in processes:
            process.join(timeout=60)
        served = num_images / (max(end for _, _, end in outcomes) - start)
        calls = server.queues[args.scorer].batch_sizes
    latencies = sorted(latency for _, client_latencies, _ in outcomes for latency in client_latencies)
    p50 = statistics.median(latencies)
    p95 = latencies[min(len(latencies) - 1, round(0.95 * (len(latencies) - 1)))]
    transport = measure_transport(args.resolution)
    ratio = served / in_process
    print(
        f"scorer {args.scorer} on {','.join(devices)}; {args.clients} clients x {args.requests} requests x "
        f"{args.batch_size} images of {args.resolution}x{args.resolution}; max_batch {args.max_batch}, "
        f"max_wait_ms {args.max_wait_ms:g}"
    )
    print(f"in-process: {in_process:.2f} images/s ({num_images} images)")
    print(
        f"server: {served:.2f} images/s; request latency p50 {p50:.3f} s, p95 {p95:.3f} s; "
        f"{len(calls)} scorer calls, mean {statistics.fmean(calls):.1f} images"
    )
    for image_format in ("raw", "png"):
        print(
            f"transport {image_format}: encode {transport[f'{image_format}_encode_ms']:.2f} ms + decode "
            f"{transport[f'{image_format}_decode_ms']:.2f} ms per image, {transport[f'{image_format}_kb']:.0f} kB"
        )
    print(f"server/in-process throughput ratio: {ratio:.2f}")
    return {"in_process": in_process, "served": served, "p50": p50, "p95": p95, "ratio": ratio, **transport}
