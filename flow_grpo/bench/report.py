"""The benchmark run and its report: matrix-product ceiling, device description, text table and JSON dict."""

from __future__ import annotations

import datetime
import platform
import statistics
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from flow_grpo.bench.flops import component_flops, count_mode_flops, count_phase_flops
from flow_grpo.bench.models import build_models
from flow_grpo.bench.phases import PhaseResult, time_call, time_phases
from flow_grpo.bench.settings import PHASES, BenchmarkSettings, resolve_device, resolve_mixed_precision
from flow_grpo.precision import mixed_precision_dtype
from flow_grpo.sampling.rollouts import states_per_call
from flow_grpo.testing.architectures import model_spec

GIB = 2**30
"""Bytes of one GiB: memory is reported in GiB everywhere (the preflight's unit too)."""

__all__ = [
    "GIB",
    "BenchmarkReport",
    "CompletionMode",
    "MatmulCeiling",
    "completion_modes",
    "describe_device",
    "format_report",
    "matmul_ceiling",
    "run_benchmark",
]


@dataclass(frozen=True)
class MatmulCeiling:
    """Rate of one large square matrix product: the practical ceiling of the device.

    Attributes:
        size: side n of the (n x n) @ (n x n) product.
        dtype: its dtype name.
        seconds: median time of one product.
    """

    size: int
    dtype: str
    seconds: float

    @property
    def flops_per_second(self) -> float:
        return 2.0 * self.size**3 / self.seconds


def matmul_ceiling(device: torch.device, dtype: torch.dtype, size: int, *, warmup: int = 3, repeats: int = 10) -> MatmulCeiling:
    """Time `size x size` matrix products in `dtype` on `device` (median of `repeats`)."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    _, times, _ = time_call(lambda: a @ b, device, warmup=warmup, repeats=repeats)
    return MatmulCeiling(size=size, dtype=str(dtype).removeprefix("torch."), seconds=statistics.median(times))


@dataclass(frozen=True)
class CompletionMode:
    """One TP-GRPO completion mode's cost per sampling batch against Flow-GRPO's (FLOPs counted on the meta device).

    Attributes:
        completion_steps: `tp.completion_steps` (0 = exact).
        rows_per_trajectory: transformer states per trajectory of the rollout (a CFG state is two batch rows).
        rollout_flops: the TP-GRPO rollout, decodes included.
        epoch_ratio: (TP-GRPO rollout + scoring its B (W + 1) images + update) over (Flow-GRPO rollout +
            scoring B images + update); None unless the rollouts, scoring and update were all counted.
    """

    completion_steps: int
    rows_per_trajectory: int
    rollout_flops: int
    epoch_ratio: float | None


def completion_modes(settings: BenchmarkSettings, phase_flops: dict[str, int | None], mode_flops: dict[int, int]) -> list[CompletionMode]:
    """The modes of `mode_flops` (completion steps -> TP-GRPO rollout FLOPs) with their epoch FLOP ratio.

    Scoring is per image, so Flow-GRPO's B final images cost `1 / (W + 1)` of the scoring phase.
    """
    needed = ("flow_grpo_rollout", "scoring", "update")
    counted = all(phase_flops.get(name) is not None for name in needed)
    modes = []
    for mode, flops in mode_flops.items():
        ratio = None
        if counted:
            scoring, update = phase_flops["scoring"], phase_flops["update"]
            flow = phase_flops["flow_grpo_rollout"] + scoring / (settings.window_size + 1) + update
            ratio = (flops + scoring + update) / flow
        rows = sum(states_per_call(settings.num_steps, settings.window_start, settings.window_size, mode))
        modes.append(CompletionMode(mode, rows, flops, ratio))
    return modes


@dataclass
class BenchmarkReport:
    """Result of `run_benchmark`.

    Attributes:
        settings: what was run.
        model: the model spec's name.
        device: the device in words (GPU name, or CPU model and threads).
        dtype: the compute dtype.
        date: ISO time of the run.
        versions: torch, diffusers, transformers, peft and Python versions.
        ceiling: the matrix-product ceiling, or None when only counted.
        components: FLOPs of single calls (see `component_flops`).
        memory: what `PhaseResult.peak_memory_bytes` means on this device.
        phases: per phase, in run order.
        modes: the TP-GRPO completion modes counted (`settings.completion_steps`); empty when not counted.
    """

    settings: BenchmarkSettings
    model: str
    device: str
    dtype: str
    date: str
    versions: dict[str, str]
    ceiling: MatmulCeiling | None
    components: dict[str, int]
    memory: str
    phases: list[PhaseResult]
    modes: list[CompletionMode] = field(default_factory=list)

    def phase(self, name: str) -> PhaseResult:
        return next(p for p in self.phases if p.name == name)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict of everything (derived rates included)."""
        ceiling = None
        if self.ceiling is not None:
            ceiling = {**asdict(self.ceiling), "tflops_per_second": self.ceiling.flops_per_second / 1e12}
        return {
            "settings": asdict(self.settings),
            "model": self.model,
            "device": self.device,
            "dtype": self.dtype,
            "date": self.date,
            "versions": self.versions,
            "matmul_ceiling": ceiling,
            "components_flops": self.components,
            "memory": self.memory,
            "phases": [phase.to_dict() for phase in self.phases],
            "completion_modes": [asdict(mode) for mode in self.modes],
        }


def describe_device(device: torch.device) -> str:
    """The device in words: the GPU's name and memory, or the CPU model and torch's thread count."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{props.name} ({props.total_memory / 2**30:.0f} GiB)"
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    except OSError:
        pass
    return f"CPU {name}, {torch.get_num_threads()} threads"


def _versions() -> dict[str, str]:
    import diffusers
    import peft
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
    }


def run_benchmark(settings: BenchmarkSettings) -> BenchmarkReport:
    """Count the FLOPs of every phase on the meta device, then (unless `count_only`) time them.

    Real-size models need a GPU for timing; with `count_only` they are only built on the meta
    device, which any machine can do.
    """
    device = resolve_device(settings)
    mixed_precision = resolve_mixed_precision(settings, device)
    dtype = mixed_precision_dtype(mixed_precision)
    spec = model_spec(settings.size)
    components: dict[str, int] = {}
    flops: dict[str, int | None] = dict.fromkeys(settings.phases)
    modes: list[CompletionMode] = []
    if settings.count_flops or settings.count_only:
        meta = build_models(spec, settings, torch.device("meta"), "no", optimized=False)
        components = component_flops(meta, settings)
        flops = count_phase_flops(meta, settings)
        first = {settings.completion_steps[0]: flops["tp_grpo_rollout"]} if "tp_grpo_rollout" in flops else {}
        modes = completion_modes(settings, flops, count_mode_flops(meta, settings, first))
        del meta
    ceiling = None
    if settings.count_only:
        phases = {name: PhaseResult(name=name, flops=flops[name]) for name in settings.phases}
        description = "meta device (FLOPs only)"
    else:
        if device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = settings.allow_tf32
        size = settings.matmul_size or (8192 if device.type == "cuda" else 1024)
        ceiling = matmul_ceiling(device, dtype if device.type == "cuda" else torch.float32, size)
        models = build_models(spec, settings, device, mixed_precision, optimized=True)
        phases = time_phases(models, settings)
        for name, result in phases.items():
            result.flops = flops[name]
            result.ceiling_flops_per_second = ceiling.flops_per_second
        description = describe_device(device)
    memory = "torch.cuda.max_memory_allocated" if device.type == "cuda" else "process max RSS (not per phase)"
    return BenchmarkReport(
        settings=settings,
        model=spec.name,
        device=description,
        dtype="any" if settings.count_only else str(dtype).removeprefix("torch."),
        date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        versions=_versions(),
        ceiling=ceiling,
        components=components,
        memory=memory if not settings.count_only else "n/a",
        phases=[phases[name] for name in PHASES if name in phases],
        modes=modes,
    )


def _si(value: float | None, unit: str = "") -> str:
    """`value` with an SI prefix: 1.23 T, 456.7 G, ...; "-" for None."""
    if value is None:
        return "-"
    for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}".rstrip()


def _phase_title(phase: PhaseResult, settings: BenchmarkSettings) -> str:
    if phase.name == "flow_grpo_rollout":
        return f"Flow-GRPO rollout ({settings.num_steps} steps)"
    if phase.name == "tp_grpo_rollout":
        return f"TP-GRPO rollout incl. decodes ({settings.num_steps} steps)"
    if phase.name == "scoring":
        return f"scoring {settings.scored_images} images, one call"
    return f"GRPO update over the window ({settings.window_size} steps)"


def format_report(report: BenchmarkReport) -> str:
    """The report as text: a few lines of context, then the per-phase table (last)."""
    s = report.settings
    components = report.components
    lines = [
        f"model {report.model}, {report.dtype}, on {report.device}; {report.date}",
        (
            f"batch {s.prompts} prompts, {s.resolution}x{s.resolution}, {s.num_steps} steps, window {s.window_size} "
            f"from {s.window_start}, guidance {s.guidance_scale}, {s.step_kind} noise {s.noise_level}, "
            f"LoRA r{s.lora_rank}, beta {s.beta}"
        ),
        (
            f"options: compile={s.compile} attention_backend={s.attention_backend or 'default'} "
            f"state_buckets={tuple(s.state_buckets)} max_states_per_call={s.max_states_per_call} "
            f"decode_chunk={s.decode_chunk} "
            f"gradient_checkpointing={s.gradient_checkpointing}; median of {s.repeats} after {s.warmup} warm-up"
        ),
    ]
    if components:
        lines.append(
            f"FLOPs per call: transformer forward {_si(components['transformer_forward_per_row'])} per row, "
            f"VAE decode {_si(components['vae_decode_per_image'])} per image, "
            f"reward {_si(components['reward_per_image'])} per image"
        )
    if report.ceiling is not None:
        c = report.ceiling
        lines.append(f"matmul ceiling: {c.size}^3 {c.dtype} at {_si(c.flops_per_second, 'FLOP/s')}")
    lines.append(f"peak memory: {report.memory}")
    if report.modes:
        lines += ["", f"TP-GRPO completion modes (window from {s.window_start}; epoch = rollout + scoring + update per batch):"]
        mode_rows = [
            (
                "exact" if m.completion_steps == 0 else f"k = {m.completion_steps}",
                str(m.rows_per_trajectory),
                _si(m.rollout_flops),
                f"{m.epoch_ratio:.2f}x" if m.epoch_ratio is not None else "-",
            )
            for m in report.modes
        ]
        lines += _table(("completion", "transformer rows / trajectory", "TP-GRPO rollout FLOP", "epoch FLOP TP / Flow"), mode_rows)
    header = ("phase", "seconds", "first run s", "compile s", "FLOP", "FLOP/s", "of matmul", "peak memory")
    rows = []
    for phase in report.phases:
        fraction = phase.fraction_of_ceiling
        memory = f"{phase.peak_memory_bytes / GIB:.2f} GiB" if phase.peak_memory_bytes is not None else "n/a"
        seconds = f"{phase.seconds:.3f}" if phase.seconds is not None else (phase.error or "-")
        rows.append(
            (
                _phase_title(phase, s),
                seconds,
                f"{phase.warmup_times[0]:.3f}" if phase.warmup_times else "-",
                f"{phase.compile_seconds:.2f}" if phase.compile_seconds is not None else "-",
                _si(phase.flops),
                _si(phase.flops_per_second),
                f"{100 * fraction:.1f}%" if fraction is not None else "-",
                memory,
            )
        )
    return "\n".join(lines + [""] + _table(header, rows))


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    """A markdown table: the first column left-aligned, the others right-aligned."""
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    table = [
        "| " + " | ".join(cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i]) for i, cell in enumerate(row)) + " |"
        for row in (header, *rows)
    ]
    table.insert(1, "|" + "|".join("-" * (w + 2) if i == 0 else "-" * (w + 1) + ":" for i, w in enumerate(widths)) + "|")
    return table
