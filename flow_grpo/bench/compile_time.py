"""Compile seconds of the trainer's phases: the whole transformer against its repeated blocks (regional).

    python -m flow_grpo.bench.compile_time                 # inductor on the CPU, 24 layers: minutes
    python -m flow_grpo.bench.compile_time --backend eager # traces only: seconds

The model is the SD3.5-Medium transformer's depth and layout (24 layers, dual attention in layers
0-12, the last block context-pre-only, rms qk-norm) at a small width, with the trainer's LoRA, so
that compile time (which grows with the graph, not with the width) dominates. For each scope
(`flow_grpo.training.compile.SCOPES`) a fresh transformer is compiled through `CompiledPhases` and
each phase runs as the trainer runs it: the rollout without gradients in eval mode, the policy
forward and backward in train mode, the LoRA-disabled reference forward without gradients.
A phase's compile seconds are its first run minus its steady run (the median of `repeats`
later runs), in wall-clock seconds and in CPU seconds of the process and its descendants (inductor's
compile workers and the C++ compilers they start): on a machine shared with other jobs the CPU
seconds hardly depend on the load, the wall-clock seconds do. Each scope runs in a process of its own
with an empty inductor cache directory (inductor also caches compiled kernels by their source, which
would let the second scope reuse the first one's), after one small warm-up compile that pays
inductor's one-time start-up. Per scope the table also splits the wall-clock compile seconds into
dynamo's tracing, the wait for the C++ kernel compilations and the rest (AOT autograd and inductor's
lowering, scheduling and code generation), and counts the C++ kernels compiled.
"""

from __future__ import annotations

import glob
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Any

import psutil
import torch
from absl import flags
from accelerate import PartialState

from flow_grpo.command_flags import parse_flags
from flow_grpo.models.sd3 import SD3Adapter
from flow_grpo.training.compile import PHASES, SCOPES, CompiledPhases
from flow_grpo.training.step import adapters_disabled, add_lora

__all__ = ["CompileTiming", "ScopeCosts", "cpu_seconds", "deep_narrow_sd3", "format_timings", "sd3_inputs", "time_compilation"]


@dataclass(frozen=True)
class CompileTiming:
    """One phase under one scope: first-run and steady seconds (wall clock and CPU), and the graphs compiled."""

    scope: str
    phase: str
    first_s: float
    steady_s: float
    graphs: int
    first_cpu_s: float = 0.0
    steady_cpu_s: float = 0.0

    @property
    def compile_s(self) -> float:
        return max(0.0, self.first_s - self.steady_s)

    @property
    def compile_cpu_s(self) -> float:
        return max(0.0, self.first_cpu_s - self.steady_cpu_s)


@dataclass(frozen=True)
class ScopeCosts:
    """Where one scope's compile seconds went (all phases): dynamo's tracing and the wait for the C++ kernel
    compilations (wall clock), the CPU seconds of inductor's compile workers and their compilers, and the
    C++ kernels compiled (-1: not counted)."""

    scope: str
    tracing_s: float
    kernel_wait_s: float
    workers_cpu_s: float = 0.0
    kernels: int = -1


def _times(process: psutil.Process) -> float:
    try:
        times = process.cpu_times()
    except psutil.NoSuchProcess:  # finished since listed: its time is in its parent's children_* now
        return 0.0
    return times.user + times.system + times.children_user + times.children_system


def cpu_seconds(descendants_only: bool = False) -> float:
    """CPU seconds (user + system) used so far by this process and its descendants (finished ones included),
    or by its descendants only."""
    me = psutil.Process()
    total = _times(me) + sum(_times(process) for process in me.children(recursive=True))
    if descendants_only:
        own = me.cpu_times()
        return total - own.user - own.system
    return total


def deep_narrow_sd3(layers: int = 24, heads: int = 2, head_dim: int = 16) -> torch.nn.Module:
    """An SD3 transformer of SD3.5-Medium's depth and block layout at a small width (float32, random weights)."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    return SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=16, out_channels=16, num_layers=layers,
        attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=64,
        caption_projection_dim=heads * head_dim, pooled_projection_dim=32, pos_embed_max_size=16,
        dual_attention_layers=tuple(range(min(13, layers - 1))), qk_norm="rms_norm",
    ).eval()


def sd3_inputs(rows: int) -> dict[str, torch.Tensor]:
    """Seeded inputs of `rows` rows for `deep_narrow_sd3`: 16 x 16 latents of 16 channels, 8 text tokens."""
    generator = torch.Generator().manual_seed(1)
    return {
        "hidden_states": torch.randn(rows, 16, 16, 16, generator=generator),
        "timestep": torch.full((rows,), 500.0),
        "encoder_hidden_states": torch.randn(rows, 8, 64, generator=generator),
        "pooled_projections": torch.randn(rows, 32, generator=generator),
    }


def _phase_run(phase: str, compiled: CompiledPhases, transformer: torch.nn.Module, inputs: dict[str, Any]):
    """The zero-argument run of `phase` as the trainer calls it."""

    def rollout() -> None:
        transformer.eval()
        with torch.no_grad():
            compiled.rollout(**inputs, return_dict=False)

    def policy() -> None:
        transformer.train()
        compiled.policy(**inputs, return_dict=False)[0].square().mean().backward()

    def reference() -> None:
        transformer.train()
        with torch.no_grad(), adapters_disabled(transformer):
            compiled.reference(**inputs, return_dict=False)

    return {"rollout": rollout, "policy": policy, "reference": reference}[phase]


def _timed(run: Any) -> tuple[float, float]:
    """Wall-clock and CPU seconds of `run()`."""
    start, start_cpu = time.perf_counter(), cpu_seconds()
    run()
    return time.perf_counter() - start, cpu_seconds() - start_cpu


def time_compilation(
    scope: str, layers: int = 24, backend: str = "inductor", rows: int = 2, repeats: int = 3
) -> list[CompileTiming]:
    """First-run and steady seconds of every phase (`PHASES` order) under `scope`, on a fresh `deep_narrow_sd3`."""
    PartialState()  # accelerate's logging needs its process state
    torch._dynamo.reset()
    transformer = deep_narrow_sd3(layers)
    add_lora(transformer, 4, 4, SD3Adapter.lora_target_modules, seed=0)
    compiled = CompiledPhases(transformer, transformer, rows, dict.fromkeys(PHASES, 1), backend=backend, scope=scope)
    inputs = sd3_inputs(rows)
    timings = []
    with torch._inductor.config.patch(fx_graph_cache=False), torch._functorch.config.patch(enable_autograd_cache=False):
        for phase in PHASES:
            run = _phase_run(phase, compiled, transformer, inputs)
            first, first_cpu = _timed(run)
            steady = [_timed(run) for _ in range(repeats)]
            graphs = sum(kind.get(phase, 0) for kind in compiled.graphs_by_kind().values())
            wall, cpu = (statistics.median(column) for column in zip(*steady))
            timings.append(CompileTiming(scope, phase, first, wall, graphs, first_cpu, cpu))
            transformer.zero_grad(set_to_none=True)
    return timings


def _recorded_seconds() -> tuple[float, float]:
    """Dynamo's tracing and inductor's wait for kernel compilations, seconds recorded in this process so far
    (what `torch._dynamo.utils.compile_times` reports)."""
    metrics = torch._dynamo.utils.compilation_time_metrics
    return sum(metrics.get("bytecode_tracing", [])), sum(metrics.get("async_compile.wait", []))


def format_timings(timings: list[CompileTiming], costs: list[ScopeCosts] = ()) -> str:
    """Per phase and scope: first run, steady run, compile seconds (wall, CPU) and graphs; per scope where the
    compile seconds went (`costs`); then totals and the ratios."""
    lines = [f"{'scope':<8}{'phase':<11}{'first s':>10}{'steady s':>10}{'compile s':>11}{'cpu s':>9}{'graphs':>8}"]
    totals: dict[str, list[float]] = {}
    for t in timings:
        lines.append(
            f"{t.scope:<8}{t.phase:<11}{t.first_s:>10.2f}{t.steady_s:>10.3f}{t.compile_s:>11.2f}{t.compile_cpu_s:>9.1f}{t.graphs:>8}"
        )
        wall, cpu = totals.setdefault(t.scope, [0.0, 0.0])
        totals[t.scope] = [wall + t.compile_s, cpu + t.compile_cpu_s]
    for c in costs:
        rest = totals.get(c.scope, [0.0, 0.0])[0] - c.tracing_s - c.kernel_wait_s
        kernels = f"{c.kernels} C++ kernels, " if c.kernels >= 0 else ""
        lines.append(
            f"{c.scope}: dynamo tracing {c.tracing_s:.1f} s, waiting for C++ kernels {c.kernel_wait_s:.1f} s, "
            f"the rest (AOT autograd, inductor lowering and codegen) {rest:.1f} s; "
            f"{kernels}compile workers {c.workers_cpu_s:.1f} cpu s"
        )
    lines.append("compile s in all: " + ", ".join(f"{scope} {wall:.1f} (cpu {cpu:.1f})" for scope, (wall, cpu) in totals.items()))
    if "model" in totals and totals.get("blocks") and min(totals["blocks"]) > 0:
        (wall, cpu), model = totals["blocks"], totals["model"]
        lines.append(f"whole model / regional: {model[0] / wall:.1f}x (cpu {model[1] / cpu:.1f}x)")
    return "\n".join(lines)


def _warm_up(backend: str) -> None:
    """One tiny compile, so that inductor's one-time start-up (imports, compile workers) is in no phase."""
    compiled = torch.compile(lambda x: (x * 2).sin(), backend=backend, fullgraph=True)
    compiled(torch.ones(4))
    torch._dynamo.reset()


def _kernel_libraries(cache: str) -> int:
    """C++ kernels inductor compiled into `cache` so far (one shared library each)."""
    return len(glob.glob(os.path.join(cache, "*", "*.so")))


def _isolated(scope: str, layers: int, backend: str, threads: int) -> tuple[list[CompileTiming], ScopeCosts]:
    """`time_compilation(scope)` and its `ScopeCosts` in a child process with an empty inductor cache directory."""
    with tempfile.TemporaryDirectory() as cache:
        command = [sys.executable, "-m", "flow_grpo.bench.compile_time", "--scopes", scope, "--layers", str(layers),
                   "--backend", backend, "--threads", str(threads), "--json"]
        done = subprocess.run(command, capture_output=True, text=True, env=os.environ | {"TORCHINDUCTOR_CACHE_DIR": cache})
    if done.returncode != 0:
        raise RuntimeError(f"compile timing of scope {scope} failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return [CompileTiming(**row) for row in result["timings"]], ScopeCosts(**result["costs"])


_FLAGS = flags.FlagValues()
flags.DEFINE_integer("layers", 24, "Transformer layers (SD3.5-Medium: 24).", lower_bound=2, flag_values=_FLAGS)
flags.DEFINE_string("backend", "inductor", "dynamo backend ('eager' only traces).", flag_values=_FLAGS)
flags.DEFINE_list("scopes", list(SCOPES), "Scopes to time, in order.", flag_values=_FLAGS)
flags.DEFINE_integer("threads", 0, "torch CPU threads; 0 = torch's default.", lower_bound=0, flag_values=_FLAGS)
flags.DEFINE_bool("json", False, "Time the first scope in this process and print it as JSON (internal).", flag_values=_FLAGS)


def main(argv: list[str] | None = None) -> int:
    """Time every scope of `--scopes`, each in its own process, and print the table (last)."""
    parsed = parse_flags(_FLAGS, argv, __doc__ or "", "python -m flow_grpo.bench.compile_time")
    unknown = [scope for scope in parsed.scopes if scope not in SCOPES]
    if unknown:
        print(f"error: --scopes takes {','.join(SCOPES)}; got {','.join(unknown)}", file=sys.stderr)
        return 2
    if parsed.threads:
        torch.set_num_threads(parsed.threads)
    if parsed.json:  # one scope, in the child process `_isolated` started
        _warm_up(parsed.backend)
        cache = os.environ.get("TORCHINDUCTOR_CACHE_DIR", "")
        kernels, (tracing, wait), workers = (_kernel_libraries(cache) if cache else 0), _recorded_seconds(), cpu_seconds(True)
        timings = time_compilation(parsed.scopes[0], parsed.layers, parsed.backend)
        after = _recorded_seconds()
        kernels = _kernel_libraries(cache) - kernels if cache else -1
        costs = ScopeCosts(parsed.scopes[0], after[0] - tracing, after[1] - wait, cpu_seconds(True) - workers, kernels)
        print(json.dumps({"timings": [asdict(t) for t in timings], "costs": asdict(costs)}), flush=True)
        return 0
    measured = [_isolated(scope, parsed.layers, parsed.backend, parsed.threads) for scope in parsed.scopes]
    print(format_timings([t for timings, _ in measured for t in timings], [costs for _, costs in measured]), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
