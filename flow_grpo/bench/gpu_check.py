"""One prepared GPU check: the memory preflight against the GPU, the real-size benchmark eager and compiled, the first-update ratio.

    bash scripts/gpu_check.sh                        # one H100/H200, under 8 minutes (installs shipped wheels first)
    python3 -m flow_grpo.bench.gpu_check --dry-run   # tiny sizes on the CPU, seconds (the test suite runs it)

Parts, in running order, each in its own process with a time limit (a slow part is reported,
not waited on), cheap and sure ones first so that a run cut off still reports them:
- `memory`: the memory preflight (`flow_grpo.training.memory.predict_memory`) for the benchmark's
  configuration (one process, one batch per epoch, text encoders offloaded: the benchmark has
  none), on the CPU; set against the eager part's measured peaks in the table.
- `eager`: the benchmark (TP-GRPO rollout, scoring, update; true-FLOP rate) at the SD3.5-Medium
  size with random weights in the presets' precision (fp16).
- `compiled`: the same phases compiled regionally (`flow_grpo.training.compile`, two state
  buckets, `--buckets`), then, in the same process on the same compiled graphs, a fresh TP-GRPO
  rollout and the first training step's importance ratio, which must be 1 within 1e-5; the
  graph count must not grow in the ratio run (nothing recompiles after the first epoch).
One table is printed last; with `$OUT` set, the table and a JSON land there too (the JSON after
every part). Peaks and predictions are GiB (2^30 bytes).
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

PARTS: tuple[str, ...] = ("memory", "eager", "compiled")
"""In running order: the cheap, sure parts first, so a cut-off run still reports them."""
RATIO_TOLERANCE = 1e-5
LIMITS_S: dict[str, float] = {"memory": 50.0, "eager": 135.0, "compiled": 285.0}
"""Time limit of each part, 470 s in all (the check's budget is 480 s). Derived from the first GPU
run (benchmarks/RESULTS.md, H200, commit 65414c3) and the CPU compile measurement:
- memory: fake-tensor traces on the CPU, 15-18 s on 2 loaded CPU cores, plus imports;
- eager: about 15 s of start-up and model building, about 60 s counting FLOPs on the meta device,
  then 3 runs (1 warm-up, 2 timed) of the TP-GRPO rollout (11.4 s), scoring (0.1 s) and the
  update (5.7 s): about 125 s;
- compiled: start-up and building (15 s); regional graphs: 3 block kinds of SD3.5-M x (2 rollout
  buckets + up to 2 policy forward-and-backward + 1 reference) = up to 15 block graphs, each
  about 1/24 of the whole model's graph, which took about 60 s per forward graph at real size:
  about 10 s per block graph, 150 s (the target of every graph of a run); the timed runs at the
  compiled targets (5.5 s rollout, 3.0 s update, 3 runs each: 26 s); the ratio run (one rollout
  and one step on the same graphs: 7 s). About 200 s, with 90 s to spare for a slower compile."""
GIB = 2**30
DRY_RUN_SLACK = 3.0
"""`--dry-run` limits are this multiple of `LIMITS_S`: it shares a small CPU, where the real-size traces of `memory` are slower."""


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


def _phase_results(phases: dict[str, Any]) -> dict[str, Any]:
    return {
        name: {
            "seconds": phase.seconds, "tflops_per_second": (phase.flops_per_second or 0) / 1e12,
            "peak_gib": (phase.peak_memory_bytes or 0) / GIB, "compile_seconds": phase.compile_seconds, "error": phase.error,
        }
        for name, phase in phases.items()
    }


def _eager(args: GpuCheckOptions) -> dict[str, Any]:
    from flow_grpo.bench.report import run_benchmark

    report = run_benchmark(_settings(args, compiled=False))
    return {"device": report.device, "dtype": report.dtype} | _phase_results({p.name: p for p in report.phases})


def _compiled(args: GpuCheckOptions) -> dict[str, Any]:
    """The compiled phases timed, then the first-update ratio on the same models and graphs."""
    from flow_grpo.bench.models import build_models
    from flow_grpo.bench.phases import time_phases
    from flow_grpo.bench.settings import resolve_device, resolve_mixed_precision
    from flow_grpo.testing.architectures import model_spec

    settings = _settings(args, compiled=True)
    device = resolve_device(settings)
    models = build_models(model_spec(settings.size), settings, device, resolve_mixed_precision(settings, device), optimized=True)
    result = _phase_results(time_phases(models, settings))
    graphs = models.compiled.graphs()
    started = time.perf_counter()
    ratio = _first_ratio(models, settings)
    return result | {
        "ratio": {"ratio_first": ratio, "ok": abs(ratio - 1.0) < RATIO_TOLERANCE, "seconds": time.perf_counter() - started},
        "graphs": graphs, "graphs_by_kind": models.compiled.graphs_by_kind(),
        "recompiled_in_ratio_run": models.compiled.graphs() != graphs,
    }


def _first_ratio(models: Any, settings: Any) -> float:
    """A fresh TP-GRPO rollout and the first training step on it: the mean importance ratio (1 when the
    rollout and the training forward run the same compiled numerics)."""
    from flow_grpo.bench.phases import benchmark_texts, rollout_phase
    from flow_grpo.training.step import training_step, window_batches

    prompts = models.adapter.encode_prompts(benchmark_texts(settings.prompts))
    samples = rollout_phase(models, settings, prompts, branches=True)
    rows = torch.arange(settings.micro_batch, device=models.device)
    unwrapped = models.accelerator.unwrap_model(models.model)
    advantages = torch.ones(settings.micro_batch, device=models.device)
    models.model.train()
    out = training_step(
        models.adapter, models.model, unwrapped, next(window_batches(samples, prompts, rows)), advantages,
        models.loss_settings, models.autocast, compiled=models.compiled,
    )
    return float(out.ratio_mean)


def benchmark_memory_config(settings: Any) -> Any:
    """The training config whose preflight describes the benchmark `settings`: the SD3 preset with the
    benchmark's batch, steps, window, bounds and LoRA, one process, one batch per epoch, text encoders
    offloaded (the benchmark has none)."""
    from flow_grpo.training.memory import load_preset

    config = load_preset("pickscore_sd3")
    sample = config.sample
    sample.batch_size = sample.group_size = settings.prompts
    sample.prompts_per_epoch = 1
    sample.num_steps, sample.window_size, sample.window_range = settings.num_steps, settings.window_size, (0, settings.window_size)
    sample.state_buckets, sample.max_states_per_call = tuple(settings.state_buckets), settings.max_states_per_call
    sample.decode_chunk = settings.decode_chunk
    config.train.batch_size, config.train.beta, config.train.updates_per_epoch = settings.micro_batch, settings.beta, 1
    config.train.lora_rank, config.train.lora_alpha = settings.lora_rank, settings.lora_alpha
    config.offload_text_encoders = True
    return config


def _memory(args: GpuCheckOptions) -> dict[str, Any]:
    from flow_grpo.training.memory import predict_memory

    report = predict_memory(benchmark_memory_config(_settings(args, compiled=False)), 1)
    return {phase.name: phase.total / GIB for phase in report.phases}


def run_part(name: str, args: GpuCheckOptions) -> dict[str, Any]:
    """Run one part in this process; returns its JSON-able result."""
    return {"memory": _memory, "eager": _eager, "compiled": _compiled}[name](args)


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
    """The one table: per phase eager and compiled seconds, compile seconds, TFLOP/s, peak and predicted GiB;
    the ratio; how each part ended."""
    eager, compiled, memory = results.get("eager", {}), results.get("compiled", {}), results.get("memory", {})
    predicted = {"tp_grpo_rollout": "sampling", "scoring": "scoring", "update": "update"}
    lines = [f"{'phase':<16}{'eager s':>9}{'comp. s':>9}{'speedup':>9}{'compile s':>10}{'eager TF/s':>11}"
             f"{'comp. TF/s':>11}{'peak GiB':>9}{'pred. GiB':>10}"]
    for phase, memory_phase in predicted.items():
        e, c = eager.get(phase, {}), compiled.get(phase, {})
        speedup = e["seconds"] / c["seconds"] if e.get("seconds") and c.get("seconds") else None
        if c.get("seconds") and e.get("tflops_per_second") and e.get("seconds"):
            c = {**c, "tflops_per_second": e["tflops_per_second"] * e["seconds"] / c["seconds"]}
        lines.append(
            f"{phase:<16}{_cell(e.get('seconds'), '.3f'):>9}{_cell(c.get('seconds'), '.3f'):>9}{_cell(speedup, '.2f'):>9}"
            f"{_cell(c.get('compile_seconds'), '.1f'):>10}{_cell(e.get('tflops_per_second'), '.1f'):>11}"
            f"{_cell(c.get('tflops_per_second'), '.1f'):>11}{_cell(e.get('peak_gib'), '.1f'):>9}"
            f"{_cell(memory.get(memory_phase), '.1f'):>10}"
        )
    ratio = compiled.get("ratio", {})
    verdict = "ok" if ratio.get("ok") and not compiled.get("recompiled_in_ratio_run") else "FAIL"
    lines.append(
        f"first-update ratio (compiled): {_cell(ratio.get('ratio_first'), '.8f')} {verdict} (|r - 1| < {RATIO_TOLERANCE:g}, "
        f"no recompile); graphs per kind {compiled.get('graphs', '-')}"
    )
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
        limit = args.limit_s or LIMITS_S[name] * (DRY_RUN_SLACK if args.dry_run else 1.0)
        results[name] = _run_isolated(name, args, limit)
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
    compiled = results["compiled"]
    failed = any("error" in result for result in results.values()) or not compiled.get("ratio", {}).get("ok")
    failed = failed or compiled.get("recompiled_in_ratio_run", True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
