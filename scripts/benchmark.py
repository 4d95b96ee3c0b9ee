"""Time and FLOP-count the GRPO phases (rollouts, scoring, one update) with random-weight models.

    python scripts/benchmark.py --size tiny                      # CPU, seconds
    python scripts/benchmark.py --size sd3 --json sd3.json       # SD3.5-Medium size, one GPU, bf16
    python scripts/benchmark.py --size sd3 --compile --state_buckets 18,36,54,72,90
    python scripts/benchmark.py --size flux --count_only         # FLOPs only (meta device), any machine
    python scripts/benchmark.py --memory --preset pickscore_flux --num_processes 8   # memory preflight, any machine

Each flag left out keeps the size's preset (`flow_grpo.bench.settings.default_settings`). The table of
seconds, true FLOPs and FLOP/s, fraction of the measured matrix-product ceiling and peak memory per
phase is printed last (`--reward_server ...` runs the reward server benchmark instead); `--json` also writes every number.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout without installing

from flow_grpo.bench import memory
from flow_grpo.bench.report import format_report, run_benchmark
from flow_grpo.bench.settings import DTYPE_FLAGS, PHASES, default_settings
from flow_grpo.testing.architectures import SIZES


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(",") if part.strip())


def _names(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def build_parser() -> argparse.ArgumentParser:
    """Flags; each `dest` is a `BenchmarkSettings` field (None = the preset's value)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=SIZES, default="tiny", help="model size: tiny models (CPU) or the real ones (GPU)")
    parser.add_argument("--json", default="", help="also write the report as JSON to this file")
    setting = parser.add_argument_group("settings (default: the size's preset)")
    add = setting.add_argument
    add("--prompts", type=int, help="trajectories per batch B")
    add("--resolution", type=int, help="image side in pixels")
    add("--steps", dest="num_steps", type=int, help="grid steps N")
    add("--window", dest="window_size", type=int, help="SDE window size W")
    add("--window_start", type=int, help="window start s")
    add("--cfg", dest="guidance_scale", type=float, help="guidance scale (SD3 CFG, FLUX guidance embedding)")
    add("--step_kind", choices=("sde", "cps"), help="stochastic step of the window")
    add("--noise_level", type=float, help="noise level a of the window steps")
    add("--lora_rank", type=int, help="LoRA rank r")
    add("--lora_alpha", type=int, help="LoRA alpha")
    add("--beta", type=float, help="KL weight; 0 skips the reference pass")
    add("--train_batch_size", type=int, help="trajectories per training micro-batch; 0 = all")
    add("--gradient_checkpointing", action=argparse.BooleanOptionalAction, help="recompute activations in backward")
    add("--max_states_per_call", type=int, help="bound on states per transformer / VAE call; 0 = none")
    add("--state_buckets", "--buckets", dest="state_buckets", type=_ints, help="state buckets, e.g. 18,36,54,72,90 (calls padded up)")
    add("--compile", action=argparse.BooleanOptionalAction, help="compile the transformer per phase, as the trainer")
    add("--compile_backend", help="dynamo backend of --compile; eager only traces")
    add("--attention_backend", help="diffusers attention backend, e.g. flash, _native_cudnn; '' = default")
    add("--device", help="device; default CUDA when available, else CPU")
    add("--dtype", choices=("auto", *DTYPE_FLAGS), help="compute dtype; auto = bf16 on CUDA, fp32 on CPU")
    add("--allow_tf32", action=argparse.BooleanOptionalAction, help="TF32 matrix products on CUDA")
    add("--warmup", type=int, help="untimed runs per phase")
    add("--repeats", type=int, help="timed runs per phase (the median is reported)")
    add("--matmul_size", type=int, help="side of the ceiling's square matmul; 0 = 8192 on CUDA, 1024 on CPU")
    add("--phases", type=_names, help=f"comma-separated subset of {','.join(PHASES)}")
    add("--count_only", action=argparse.BooleanOptionalAction, help="count FLOPs on the meta device only, no timing")
    add("--seed", type=int, help="seed of LoRA init, embeddings, noise and advantages")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    if "--memory" in args:  # the memory preflight: --memory --preset NAME --num_processes N [--device_gb G]
        return memory.main(args)
    if "--reward_server" in args:  # reward server throughput: flow_grpo.reward_server.benchmark's own flags
        from flow_grpo.reward_server.benchmark import main as reward_server_main

        reward_server_main([arg for arg in args if arg != "--reward_server"])
        return 0
    parser = build_parser()
    args = parser.parse_args(argv)
    overrides = {key: value for key, value in vars(args).items() if key not in ("size", "json") and value is not None}
    try:
        settings = default_settings(args.size, **overrides)
    except ValueError as error:
        parser.error(str(error))
    report = run_benchmark(settings)
    if args.json:
        directory = os.path.dirname(os.path.abspath(args.json))
        os.makedirs(directory, exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(report.to_dict(), f, indent=2)
            f.write("\n")
    print(format_report(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
