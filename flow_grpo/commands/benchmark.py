"""Time and FLOP-count the GRPO phases (rollouts, scoring, one update) with random-weight models.

The `flow-grpo-benchmark` command; from a checkout, `python scripts/benchmark.py` with the same flags:

    flow-grpo-benchmark --size tiny                      # CPU, seconds
    flow-grpo-benchmark --size sd3 --json sd3.json       # SD3.5-Medium size, one GPU, bf16
    flow-grpo-benchmark --size sd3 --compile --state_buckets 18,36,54,72,90
    flow-grpo-benchmark --size flux --count_only         # FLOPs only (meta device), any machine
    flow-grpo-benchmark --size sd3 --count_only --completion_steps 0,1,2,3   # cost of each TP-GRPO completion mode
    flow-grpo-benchmark --memory --preset pickscore_flux --num_processes 8   # memory preflight, any machine
    flow-grpo-benchmark --reward_server --scorer tiny_clip --clients 2       # reward server throughput

Each flag left out keeps the size's preset (`flow_grpo.bench.settings.default_settings`); the flags
are named like the config keys they mirror (`--num_steps`, `--window_size`, `--guidance_scale`,
`--state_buckets`, `--max_states_per_call`, `--decode_chunk`, `--completion_steps`; `--steps`, `--window`, `--cfg`, `--buckets` are aliases).
The table of seconds, true FLOPs and FLOP/s, fraction of the measured matrix-product ceiling and
peak memory per phase is printed last; `--json` also writes every number. `--memory` runs the memory
preflight (`flow-grpo-memory`) and `--reward_server` the reward server benchmark
(`flow-grpo-reward-server-benchmark`) instead, each with its own flags.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from absl import flags

from flow_grpo.bench.settings import DTYPE_FLAGS, PHASES
from flow_grpo.command_flags import int_list, parse_flags
from flow_grpo.commands.errors import command_main, input_errors
from flow_grpo.testing.architectures import SIZES

_FLAGS = flags.FlagValues()
_SETTINGS: list[str] = []
"""The flags that are `BenchmarkSettings` fields of the same name; None (left out) keeps the size's preset."""


def _setting(define: Callable[..., Any], name: str, help_text: str, **kwargs: Any) -> None:
    """Define `--name` with `define` (e.g. `flags.DEFINE_integer`) and no default: unset keeps the preset."""
    define(name, None, help=help_text, flag_values=_FLAGS, **kwargs)
    _SETTINGS.append(name)


flags.DEFINE_enum("size", "tiny", SIZES, "Model size: tiny models (CPU) or the real ones (GPU).", flag_values=_FLAGS)
flags.DEFINE_string("json", "", "Also write the report as JSON to this file.", flag_values=_FLAGS)
flags.DEFINE_bool("memory", False, "Run the memory preflight (flow-grpo-memory's flags) instead.", flag_values=_FLAGS)
flags.DEFINE_bool("reward_server", False, "Run the reward server benchmark (its own flags) instead.", flag_values=_FLAGS)
_setting(flags.DEFINE_integer, "prompts", "Trajectories per batch B.")
_setting(flags.DEFINE_integer, "resolution", "Image side in pixels.")
_setting(flags.DEFINE_integer, "num_steps", "Grid steps N (sample.num_steps).")
_setting(flags.DEFINE_integer, "window_size", "SDE window size W (sample.window_size).")
_setting(flags.DEFINE_integer, "window_start", "Window start s.")
_setting(flags.DEFINE_float, "guidance_scale", "Guidance scale (SD3 CFG, FLUX guidance embedding).")
_setting(flags.DEFINE_enum, "step_kind", "Stochastic step of the window.", enum_values=("sde", "cps"))
_setting(flags.DEFINE_float, "noise_level", "Noise level a of the window steps (sample.noise_level).")
_setting(flags.DEFINE_integer, "lora_rank", "LoRA rank r (train.lora_rank).")
_setting(flags.DEFINE_integer, "lora_alpha", "LoRA alpha (train.lora_alpha).")
_setting(flags.DEFINE_float, "beta", "KL weight; 0 skips the reference pass (train.beta).")
_setting(flags.DEFINE_integer, "train_batch_size", "Trajectories per training micro-batch; 0 = all.")
_setting(flags.DEFINE_bool, "gradient_checkpointing", "Recompute activations in backward.")
_setting(flags.DEFINE_integer, "max_states_per_call", "Bound on states per transformer / VAE call; 0 = none.")
_setting(flags.DEFINE_integer, "decode_chunk", "Images per VAE decode call of a rollout (sample.decode_chunk); 0 = one call.")
_setting(flags.DEFINE_list, "state_buckets", "State buckets, e.g. 18,36,54,72,90 (calls padded up).")
_setting(
    flags.DEFINE_list, "completion_steps",
    "TP-GRPO completion modes (tp.completion_steps), e.g. 0,1,2,3; the first is timed, every one counted.",
)
_setting(flags.DEFINE_bool, "compile", "Compile the transformer per phase, as the trainer.")
_setting(flags.DEFINE_string, "compile_backend", "Dynamo backend of --compile; eager only traces.")
_setting(flags.DEFINE_string, "attention_backend", "Diffusers attention backend, e.g. flash, _native_cudnn; '' = default.")
_setting(flags.DEFINE_string, "device", "Device; default CUDA when available, else CPU.")
_setting(flags.DEFINE_enum, "dtype", "Compute dtype; auto = bf16 on CUDA, fp32 on CPU.", enum_values=("auto", *DTYPE_FLAGS))
_setting(flags.DEFINE_bool, "allow_tf32", "TF32 matrix products on CUDA.")
_setting(flags.DEFINE_integer, "warmup", "Untimed runs per phase.")
_setting(flags.DEFINE_integer, "repeats", "Timed runs per phase (the median is reported).")
_setting(flags.DEFINE_integer, "matmul_size", "Side of the ceiling's square matmul; 0 = 8192 on CUDA, 1024 on CPU.")
_setting(flags.DEFINE_list, "phases", f"Comma-separated subset of {','.join(PHASES)}.")
_setting(flags.DEFINE_bool, "count_only", "Count FLOPs on the meta device only, no timing.")
_setting(flags.DEFINE_integer, "seed", "Seed of LoRA init, embeddings, noise and advantages.")
for _alias, _name in (("steps", "num_steps"), ("window", "window_size"), ("cfg", "guidance_scale"), ("buckets", "state_buckets")):
    flags.DEFINE_alias(_alias, _name, flag_values=_FLAGS)


@command_main(hint="each setting is a flag of the same name (`flow-grpo-benchmark --help`)")
def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark the flags describe and print its table (`argv`: the flags, default `sys.argv[1:]`)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if "--memory" in args:  # the memory preflight: --memory --preset NAME --num_processes N [--device_gb G]
        from flow_grpo.commands import memory

        return memory.main(args)
    if "--reward_server" in args:  # reward server throughput: flow_grpo.reward_server.benchmark's own flags
        from flow_grpo.reward_server import benchmark as reward_server_benchmark

        return reward_server_benchmark.main([arg for arg in args if arg != "--reward_server"])
    from flow_grpo.bench.report import format_report, run_benchmark
    from flow_grpo.bench.settings import default_settings

    parsed = parse_flags(_FLAGS, args, __doc__, "flow-grpo-benchmark")
    overrides = {name: parsed[name].value for name in _SETTINGS if parsed[name].value is not None}
    for name in ("state_buckets", "completion_steps"):
        if name in overrides:
            overrides[name] = int_list(overrides[name], name)
    if "phases" in overrides:
        overrides["phases"] = tuple(name.strip() for name in overrides["phases"] if name.strip())
    with input_errors(ValueError):  # a setting out of range, named by default_settings
        settings = default_settings(parsed.size, **overrides)
    if parsed.json:  # before the benchmark runs: a --json that cannot be written fails in seconds
        os.makedirs(os.path.dirname(os.path.abspath(parsed.json)), exist_ok=True)
    report = run_benchmark(settings)
    if parsed.json:
        with open(parsed.json, "w") as f:
            json.dump(report.to_dict(), f, indent=2)
            f.write("\n")
    print(format_report(report), flush=True)
    return 0


@command_main()
def reward_server_main(argv: Sequence[str] | None = None) -> int:
    """`flow-grpo-reward-server-benchmark`: the reward server benchmark (its own flags), with one-line errors."""
    from flow_grpo.reward_server import benchmark as reward_server_benchmark

    return reward_server_benchmark.main(argv)


if __name__ == "__main__":
    sys.exit(main())
