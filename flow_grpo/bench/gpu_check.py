"""One prepared GPU check: real-size benchmark eager and compiled, the first-update ratio, memory vs prediction.

    python3 -m flow_grpo.bench.gpu_check             # one H100/H200, under 8 minutes
    python3 -m flow_grpo.bench.gpu_check --dry-run   # tiny sizes on the CPU, seconds (the test suite runs it)

Parts, each in its own process with a time limit (a slow part is reported, not waited on):
- `eager`, `compiled`: the benchmark (TP-GRPO rollout, scoring, update; true-FLOP rate) at the
  SD3.5-Medium size with random weights in the presets' precision (fp16), compiled per phase
  with two state buckets (`--buckets`) so that few graphs compile.
- `ratio`: a compiled TP-GRPO rollout, then the first training step's importance ratio, which
  must be 1 within 1e-5.
- `memory`: the memory preflight (`flow_grpo.training.memory.predict_memory`) for the benchmark's
  configuration (one process, one batch per epoch, text encoders offloaded: the benchmark has
  none), set against the eager part's measured peaks.
One table is printed last; with `$OUT` set, the table and a JSON land there too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

import torch
from absl import flags

from flow_grpo.command_flags import int_list, parse_flags

PARTS: tuple[str, ...] = ("eager", "memory", "compiled", "ratio")
"""In running order: the cheap, sure parts first, so a cut-off run still reports them."""
RATIO_TOLERANCE = 1e-5
LIMITS_S: dict[str, float] = {"eager": 170.0, "memory": 50.0, "compiled": 240.0, "ratio": 110.0}
"""Time limit of each part (570 s in all): the eager part counts FLOPs on the meta device (about a
minute of CPU); compiling takes about 60 s per graph at real size (4 graphs in `compiled`, which
reuses the eager part's FLOP counts); `ratio` compiles the same graphs again, mostly from inductor's cache."""
GB = 1024**3


def _settings(args: GpuCheckOptions, compiled: bool) -> Any:
    from flow_grpo.bench.settings import default_settings

    size = "tiny" if args.dry_run else "sd3"
    options: dict[str, Any] = {"phases": ("tp_grpo_rollout", "scoring", "update"), "warmup": 1, "repeats": args.repeats}
    if not args.dry_run:
        options["dtype"] = "fp16"
    if compiled:
        options.update(compile=True, state_buckets=args.buckets, compile_backend="eager" if args.dry_run else "inductor")
        options["count_flops"] = False  # the same work as the eager part, which counts it
    return default_settings(size, **options)


def _benchmark(args: GpuCheckOptions, compiled: bool) -> dict[str, Any]:
    from flow_grpo.bench.report import run_benchmark

    report = run_benchmark(_settings(args, compiled))
    result: dict[str, Any] = {"device": report.device, "dtype": report.dtype}
    for phase in report.phases:
        result[phase.name] = {
            "seconds": phase.seconds, "tflops_per_second": (phase.flops_per_second or 0) / 1e12,
            "peak_gb": (phase.peak_memory_bytes or 0) / GB, "error": phase.error,
        }
    return result


def _ratio(args: GpuCheckOptions) -> dict[str, Any]:
    from flow_grpo.bench.models import build_models
    from flow_grpo.bench.phases import benchmark_texts, rollout_phase
    from flow_grpo.bench.settings import resolve_device, resolve_mixed_precision
    from flow_grpo.training.step import training_step, window_batches
    from flow_grpo.testing.architectures import model_spec

    settings = _settings(args, compiled=True)
    device = resolve_device(settings)
    models = build_models(model_spec(settings.size), settings, device, resolve_mixed_precision(settings, device), optimized=True)
    prompts = models.adapter.encode_prompts(benchmark_texts(settings.prompts))
    samples = rollout_phase(models, settings, prompts, branches=True)
    rows = torch.arange(settings.micro_batch, device=device)
    unwrapped = models.accelerator.unwrap_model(models.model)
    advantages = torch.ones(settings.micro_batch, device=device)
    models.model.train()
    out = training_step(
        models.adapter, models.model, unwrapped, next(window_batches(samples, prompts, rows)), advantages,
        models.loss_settings, models.autocast, compiled=models.compiled,
    )
    ratio = float(out.ratio_mean)
    return {"ratio_first": ratio, "ok": abs(ratio - 1.0) < RATIO_TOLERANCE, "graphs": models.compiled.graphs()}


def _memory(args: GpuCheckOptions) -> dict[str, Any]:
    from flow_grpo.training.memory import load_preset, predict_memory

    settings = _settings(args, compiled=False)
    config = load_preset("pickscore_sd3")
    sample = config.sample
    sample.batch_size = sample.group_size = settings.prompts
    sample.prompts_per_epoch = 1
    sample.num_steps, sample.window_size, sample.window_range = settings.num_steps, settings.window_size, (0, settings.window_size)
    sample.state_buckets, sample.max_states_per_call, sample.decode_chunk = (), 0, settings.decode_chunk
    config.train.batch_size, config.train.beta, config.train.updates_per_epoch = settings.micro_batch, settings.beta, 1
    config.train.lora_rank, config.train.lora_alpha = settings.lora_rank, settings.lora_alpha
    config.offload_text_encoders = True
    report = predict_memory(config, 1)
    return {phase.name: phase.total / GB for phase in report.phases}


def run_part(name: str, args: GpuCheckOptions) -> dict[str, Any]:
    """Run one part in this process; returns its JSON-able result."""
    if name in ("eager", "compiled"):
        return _benchmark(args, compiled=name == "compiled")
    if name == "ratio":
        return _ratio(args)
    return _memory(args)


def _run_isolated(name: str, args: GpuCheckOptions, limit: float) -> dict[str, Any]:
    """Run part `name` in a child process with `limit` seconds; a timeout or failure is recorded, not raised."""
    command = [sys.executable, "-m", "flow_grpo.bench.gpu_check", "--part", name, "--repeats", str(args.repeats),
               "--buckets", ",".join(map(str, args.buckets))] + (["--dry-run"] if args.dry_run else [])
    started = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=limit)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {limit:.0f} s"}
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["failed"])[-1], "wall_s": seconds}
    return json.loads(done.stdout.strip().splitlines()[-1]) | {"wall_s": seconds}


def _cell(value: Any, spec: str) -> str:
    return format(value, spec) if isinstance(value, (int, float)) and value is not None else "-"


def format_table(results: dict[str, dict[str, Any]]) -> str:
    """The one table: per phase eager and compiled seconds, TFLOP/s and peaks, predicted GB; the ratio; errors."""
    eager, compiled, memory = results.get("eager", {}), results.get("compiled", {}), results.get("memory", {})
    predicted = {"tp_grpo_rollout": "sampling", "scoring": "scoring", "update": "update"}
    lines = [f"{'phase':<16}{'eager s':>9}{'comp. s':>9}{'speedup':>9}{'eager TF/s':>11}{'comp. TF/s':>11}"
             f"{'peak GB':>9}{'pred. GB':>9}"]
    for phase, memory_phase in predicted.items():
        e, c = eager.get(phase, {}), compiled.get(phase, {})
        speedup = e["seconds"] / c["seconds"] if e.get("seconds") and c.get("seconds") else None
        if c.get("seconds") and e.get("tflops_per_second") and e.get("seconds"):
            c = {**c, "tflops_per_second": e["tflops_per_second"] * e["seconds"] / c["seconds"]}
        lines.append(
            f"{phase:<16}{_cell(e.get('seconds'), '.3f'):>9}{_cell(c.get('seconds'), '.3f'):>9}{_cell(speedup, '.2f'):>9}"
            f"{_cell(e.get('tflops_per_second'), '.1f'):>11}{_cell(c.get('tflops_per_second'), '.1f'):>11}"
            f"{_cell(e.get('peak_gb'), '.1f'):>9}{_cell(memory.get(memory_phase), '.1f'):>9}"
        )
    ratio = results.get("ratio", {})
    verdict = "ok" if ratio.get("ok") else "FAIL"
    lines.append(f"first-update ratio (compiled): {_cell(ratio.get('ratio_first'), '.8f')} {verdict} (|r - 1| < {RATIO_TOLERANCE:g})")
    for name, result in results.items():
        lines.append(f"{name}: {result.get('error') or 'done'} in {_cell(result.get('wall_s'), '.0f')} s")
    lines.append(f"device: {eager.get('device', '-')}, dtype {eager.get('dtype', '-')}")
    return "\n".join(lines)


_FLAGS = flags.FlagValues()
flags.DEFINE_bool("dry-run", False, "Tiny sizes on the CPU (seconds); compile only traces.", flag_values=_FLAGS)
flags.DEFINE_enum("part", None, list(PARTS), "Run one part in this process and print its JSON (internal).", flag_values=_FLAGS)
flags.DEFINE_integer("repeats", 2, "Timed runs per phase (median reported).", lower_bound=1, flag_values=_FLAGS)
flags.DEFINE_list("buckets", ["45", "90"], "State buckets of the compiled rollout (one graph each).", flag_values=_FLAGS)
flags.DEFINE_float("limit_s", 0.0, "Time limit of every part, seconds; 0 = LIMITS_S.", lower_bound=0.0, flag_values=_FLAGS)


@dataclass(frozen=True)
class GpuCheckOptions:
    """The flags of `main`, also passed on to the part processes."""

    dry_run: bool
    part: str | None
    repeats: int
    buckets: tuple[int, ...]
    limit_s: float


def main(argv: list[str] | None = None) -> int:
    """Run the parts (or one with `--part`), print the table last; 1 when a part failed or the ratio is off."""
    parsed = parse_flags(_FLAGS, argv, __doc__ or "", "scripts/gpu_check.sh")
    buckets = int_list(parsed.buckets, "buckets") or ()
    if parsed["dry-run"].value and buckets == (45, 90):
        buckets = (6, 12)  # the tiny preset: 3 prompts, window 3
    args = GpuCheckOptions(parsed["dry-run"].value, parsed.part, parsed.repeats, buckets, parsed.limit_s)
    if args.part:
        print(json.dumps(run_part(args.part, args)), flush=True)
        return 0
    out = os.environ.get("OUT")
    results: dict[str, dict[str, Any]] = {}
    for name in PARTS:
        results[name] = _run_isolated(name, args, args.limit_s or LIMITS_S[name])
        print(f"{name}: {json.dumps(results[name])}", file=sys.stderr, flush=True)
        if out:  # after every part, so a run cut off from outside still leaves what it measured
            os.makedirs(out, exist_ok=True)
            with open(os.path.join(out, "gpu_check.json"), "w") as f:
                json.dump(results, f, indent=2)
    table = format_table(results)
    if out:
        with open(os.path.join(out, "gpu_check.txt"), "w") as f:
            f.write(table + "\n")
    print(table, flush=True)
    failed = any("error" in result for result in results.values()) or not results["ratio"].get("ok")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
