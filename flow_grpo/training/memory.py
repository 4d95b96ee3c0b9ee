"""Memory preflight: the per-process peak device memory of a preset's phases, predicted without a GPU.

`predict_memory(config, world_size)` builds the preset's real architectures under fake tensors
(`flow_grpo.training.tracing`), counts resident bytes exactly and traces the largest call of each phase:

- weights: transformer and text encoders in the mixed-precision dtype, VAE in float32, the
  on-device reward models in their reward dtype ("auto" = float16 on CUDA). With
  `offload_text_encoders` the text encoders are on the device only in the "encoding" phase (the
  epoch's distinct prompts are encoded first, then the encoders move to the CPU);
- training state: LoRA parameters (float32), their gradients (update only), AdamW's two float32
  states, the EMA shadow (`train.ema`) and DDP's gradient buckets (more than one process);
- buffers: what a process keeps for the epoch (rollout latents, prompt embeddings, and during
  sampling the uint8 final and completed images waiting for the scorer, counted as if none were
  scored before the last batch is sampled). The "encoding" phase holds the previous epoch's buffers;
- activations: the largest call of the phase, traced at real size: the rollout's largest
  transformer call (lockstep TP-GRPO: main + baseline + W - 1 branches, times 2 rows with CFG,
  bounded by `sample.max_states_per_call` or the largest state bucket) or its VAE decode
  (`sample.decode_chunk` images per call), the reward's largest image batch (scoring runs in a
  thread while sampling goes on, so the sampling phase holds both), and one training
  micro-batch's forward + LoRA-disabled reference pass + backward. The text encoders' own
  activations (a few hundred MB for a sampling batch of prompts) are not traced.

Traces run under CPU autocast with CUDA's float32 normalisations (`autocast_policy.cuda_autocast`):
the VAE decoder's group norms at full image resolution are float32 on a GPU. Activations are the
larger of the traced live-storage peak and the bytes saved for backward, times
`1 + TRANSIENT_ALLOWANCE`: a caching allocator's rounding, kernel workspaces and the temporaries
the trace does not see. The allowance is fitted to the first GPU measurement (benchmarks/RESULTS.md,
H200, SD3.5-Medium size, 9 prompts, CFG, LoRA r32): the rollout decoding all 90 images in one call
peaked at 68.9 GiB and the update at 48.7 GiB, i.e. 1.10 and 1.01 times the traced activations
plus resident bytes; 0.05 predicts both within 4 %. Sizes are GiB (2^30 bytes).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import ml_collections
import torch
from accelerate.logging import get_logger
from torch._subclasses.fake_tensor import FakeTensorMode

from flow_grpo.training import tracing
from flow_grpo.training.autocast_policy import cuda_autocast, float32_norms
from flow_grpo.run.config_checks import Layout, derive_layout
from flow_grpo.models import ModelAdapter
from flow_grpo.precision import mixed_precision_dtype
from flow_grpo.run.paths import REPO_ROOT
from flow_grpo.sampling.rollouts import states_per_call
from flow_grpo.training.step import LossSettings, WindowBatch, loss_settings, training_step


__all__ = [
    "GIB",
    "PHASES",
    "TRANSIENT_ALLOWANCE",
    "InsufficientMemoryError",
    "MemoryReport",
    "PhaseMemory",
    "check_fits",
    "format_report",
    "predict_memory",
    "preflight",
    "rollout_call_states",
    "traced_update",
    "update_trace_batch",
]

logger = get_logger(__name__)

GIB = 2**30
TRANSIENT_ALLOWANCE = 0.05
"""Fraction added to every traced activation peak (allocator rounding, workspaces, untraced temporaries)."""

PHASES = ("encoding", "sampling", "scoring", "update")

_SIGMA_MAX_PLACEHOLDER = 0.99
"""The SDE step's noise scale in traces: fake tensors carry no values, so no value changes what is traced."""


class InsufficientMemoryError(RuntimeError):
    """The predicted peak does not fit the device; the message says which settings to change."""


@dataclass(frozen=True)
class PhaseMemory:
    """Predicted bytes of one phase on one process."""

    name: str
    weights: int
    training_state: int
    buffers: int
    activations: int

    @property
    def total(self) -> int:
        return self.weights + self.training_state + self.buffers + self.activations


@dataclass(frozen=True)
class MemoryReport:
    """The prediction for one config and world size.

    Attributes:
        model: architecture label.
        world_size: processes of the job.
        phases: per-phase bytes, in `PHASES` order.
        components: named resident and traced byte counts behind the phases.
        settings: the config values the prediction depends on (for advice and printing).
    """

    model: str
    world_size: int
    phases: tuple[PhaseMemory, ...]
    components: dict[str, int] = field(default_factory=dict)
    settings: dict[str, object] = field(default_factory=dict)

    @property
    def peak(self) -> int:
        """Bytes of the largest phase."""
        return max(phase.total for phase in self.phases)

    @property
    def peak_phase(self) -> PhaseMemory:
        return max(self.phases, key=lambda phase: phase.total)

    def phase(self, name: str) -> PhaseMemory:
        return next(phase for phase in self.phases if phase.name == name)


# -------------------------------------------------------------------------------------- traces

_TRACES: dict[str, dict[str, int]] = {}


def _key(*parts: object) -> str:
    return json.dumps(parts, sort_keys=True, default=str)


def _autocast(dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Autocast as the trainer's `accelerator.autocast()` on CUDA (fake tensors live on the CPU device)."""
    return cuda_autocast(dtype)


def update_trace_batch(adapter: ModelAdapter, rows: int, resolution: int, text_tokens: int | None) -> WindowBatch:
    """A window step of `rows` trajectories shaped as the trainer's (values are placeholders: under fake
    tensors only shapes and dtypes matter). `text_tokens` None = the adapter's own prompt encoding."""
    latents = adapter.initial_latents(rows, resolution, None)
    sigmas = torch.full((rows,), 0.5)
    prompts = tracing.fake_prompts(adapter, rows, text_tokens) if text_tokens else adapter.encode_prompts(
        [f"a prompt {i}" for i in range(rows)]
    )
    return WindowBatch(prompts, latents, torch.zeros_like(latents), sigmas, sigmas * 0.5, torch.zeros(rows))


def traced_update(
    adapter: ModelAdapter,
    batch: WindowBatch,
    advantages: torch.Tensor,
    settings: LossSettings,
    dtype: torch.dtype,
    saved: tracing.SavedBytes | None = None,
) -> None:
    """One micro-batch window step exactly as the trainer runs it (`step.training_step`), then its backward.

    `advantages` (b,); `saved`, if given, counts what the step saves for backward (the policy forward,
    the step math and the loss; the reference pass runs without grad and saves nothing).
    """
    transformer = adapter.transformer
    transformer.train()
    with float32_norms():  # also around the backward: checkpointed blocks recompute their forward there
        with saved if saved is not None else contextlib.nullcontext():
            out = training_step(adapter, transformer, transformer, batch, advantages, settings, lambda: _autocast(dtype))
        out.loss.backward()
    transformer.eval()


@dataclass
class _FakeBuild:
    """A fake-tensor adapter with LoRA, kept for several traces (built once per architecture and dtype)."""

    mode: FakeTensorMode
    adapter: ModelAdapter
    trainable: list[torch.nn.Parameter]
    model_tensors: list[torch.Tensor]


_BUILDS: dict[str, _FakeBuild] = {}


def _fake_build(arch: tracing.Architecture, dtype: torch.dtype, guidance_scale: float, lora: tuple[int, int],
                gradient_checkpointing: bool) -> _FakeBuild:
    key = _key(arch.components, arch.family, arch.text_tokens, str(dtype), guidance_scale > 1.0, lora, gradient_checkpointing)
    if key not in _BUILDS:
        mode = tracing.fake_mode()
        with mode:
            adapter, trainable = tracing.build_fake_adapter(
                arch.family, arch.components, dtype, guidance_scale=guidance_scale, text_tokens=arch.text_tokens,
                lora=lora, gradient_checkpointing=gradient_checkpointing,
            )
        _BUILDS[key] = _FakeBuild(mode, adapter, trainable, tracing.module_tensors(adapter.transformer, adapter.pipeline.vae))
    return _BUILDS[key]


def _diffusion_traces(
    arch: tracing.Architecture,
    dtype: torch.dtype,
    *,
    resolution: int,
    guidance_scale: float,
    lora: tuple[int, int],
    gradient_checkpointing: bool,
    train_rows: int,
    rollout_states: int,
    decode_states: int,
    settings: LossSettings,
) -> dict[str, int]:
    """Trace the update micro-batch, the largest rollout call and the largest decode; bytes by name.

    Each trace is cached by what it depends on, so presets that share an architecture and shape
    trace it once per process.
    """
    build = _fake_build(arch, dtype, guidance_scale, lora, gradient_checkpointing)
    adapter, trainable, model_tensors = build.adapter, build.trainable, build.model_tensors
    base = _key(arch.components, arch.family, arch.text_tokens, str(dtype), resolution, guidance_scale > 1.0, lora,
                gradient_checkpointing)
    lora_ids = {id(p) for p in trainable}
    result = {
        "transformer_bytes": tracing.module_bytes(adapter.transformer, dtype, exclude=lora_ids),
        "vae_bytes": tracing.module_bytes(adapter.pipeline.vae, torch.float32),
        "lora_numel": sum(p.numel() for p in trainable),
        "cfg_rows": 2 if adapter.uses_cfg else 1,
    }

    def inputs(rows: int) -> tuple:
        latents = adapter.initial_latents(rows, resolution, None)
        return latents, torch.full((rows,), 0.5), tracing.fake_prompts(adapter, rows, arch.text_tokens)

    with build.mode:
        latents, _, prompts = inputs(1)
        result["latent_numel"] = latents.numel()
        result["prompt_bytes"] = sum(t.numel() * t.element_size() for t in prompts.tensors.values())
        key = _key(base, "update", train_rows, settings.beta > 0)  # step kind and noise level change no shape
        if key not in _TRACES:
            batch = update_trace_batch(adapter, train_rows, resolution, arch.text_tokens)
            advantages = torch.empty(train_rows)
            saved = tracing.SavedBytes(model_tensors)
            existing = [*model_tensors, batch.latents, batch.next_latents, batch.sigmas, batch.next_sigmas,
                        batch.log_probs, advantages, *batch.prompts.tensors.values()]
            live = tracing.live_peak(lambda: traced_update(adapter, batch, advantages, settings, dtype, saved), existing)
            for param in trainable:
                param.grad = None
            _TRACES[key] = {"update_live": live, "update_saved": saved.bytes}
        result.update(_TRACES[key])

        key = _key(base, "rollout", rollout_states)
        if key not in _TRACES:
            latents, sigmas, prompts = inputs(rollout_states)

            def velocity_call() -> torch.Tensor:
                with torch.no_grad(), _autocast(dtype):
                    return adapter.velocity(latents, sigmas, prompts)

            existing = [*model_tensors, latents, sigmas, *prompts.tensors.values()]
            _TRACES[key] = {"rollout_live": tracing.live_peak(velocity_call, existing)}
        result.update(_TRACES[key])

        key = _key(base, "decode", decode_states)
        if key not in _TRACES:
            latents = adapter.initial_latents(decode_states, resolution, None)

            def decode_call() -> torch.Tensor:
                with torch.no_grad(), _autocast(dtype):
                    return adapter.decode(latents)

            _TRACES[key] = {"decode_live": tracing.live_peak(decode_call, [*model_tensors, latents])}
        result.update(_TRACES[key])
    return result


# ---------------------------------------------------------------------------------- prediction


def rollout_call_states(config: ml_collections.ConfigDict) -> tuple[int, int]:
    """States in the largest rollout transformer call and in the largest VAE decode call.

    Lockstep TP-GRPO with exact completions carries B (W + 1) states at the end of the window (main,
    baseline and W - 1 branches); with `tp.completion_steps` the largest call over every window
    start of `sample.window_range` (`flow_grpo.sampling.rollouts.states_per_call`), B for `k = 1`;
    Flow-GRPO carries B. A bound (`max_states_per_call`) or the largest state bucket caps the
    transformer call; `decode_chunk` caps the decode of the B (W + 1) completed images.
    """
    sample = config.sample
    per_trajectory = 1
    if config.algorithm == "tp_grpo":
        low, high = tuple(sample.window_range)
        per_trajectory = max(
            max(states_per_call(sample.num_steps, start, sample.window_size, config.tp.completion_steps))
            for start in range(low, high - sample.window_size + 1)
        )
    live = sample.batch_size * per_trajectory
    buckets = tuple(sample.state_buckets)
    if buckets:
        call = min((b for b in buckets if b >= live), default=max(buckets))
    else:
        call = min(live, sample.max_states_per_call or live)
    images = sample.batch_size * (sample.window_size + 1 if config.algorithm == "tp_grpo" else 1)
    decode = min(images, sample.decode_chunk or images)
    return call, decode


def _epoch_buffers(config: ml_collections.ConfigDict, layout: Layout, latent_numel: int, prompt: int) -> tuple[int, int]:
    """Bytes a process keeps for the epoch: (at the end of sampling, during the update).

    `latent_numel`: elements of one state's latents; `prompt`: bytes of one prompt's embeddings
    (both as the family's adapter lays them out).
    """
    sample = config.sample
    window = sample.window_size
    recorded = 2 * window * latent_numel * 4 + window * (4 + 4 + 4 + 8)  # latents, next, log-probs, sigmas, steps
    image = 3 * sample.resolution**2  # uint8
    images = image * (window + 1 if config.algorithm == "tp_grpo" else 1)
    per_process = layout.trajectories_per_process
    return per_process * (prompt + recorded + images), per_process * (prompt + recorded + 8)


def predict_memory(config: ml_collections.ConfigDict, world_size: int) -> MemoryReport:
    """Predict the per-process peak memory of sampling, scoring and the update of `config` on `world_size` processes.

    Runs on any machine (fake tensors; a few seconds per distinct architecture and shape, cached).
    """
    layout = derive_layout(config, world_size)
    dtype = mixed_precision_dtype(config.mixed_precision)
    arch = tracing.architecture(config)
    sample, train = config.sample, config.train
    rollout_states, decode_states = rollout_call_states(config)
    traces = _diffusion_traces(
        arch, dtype, resolution=sample.resolution, guidance_scale=sample.guidance_scale,
        lora=(train.lora_rank, train.lora_alpha), gradient_checkpointing=train.gradient_checkpointing,
        train_rows=train.batch_size, rollout_states=rollout_states, decode_states=decode_states,
        settings=loss_settings(config, sigma_max=_SIGMA_MAX_PLACEHOLDER),
    )
    scored_per_call = sample.batch_size * (sample.window_size + 1 if config.algorithm == "tp_grpo" else 1)
    rewards = {r.name: tracing.reward_trace(r, min(r.batch_size, scored_per_call)) for r in tracing.reward_models(config)}

    lora = 4 * traces["lora_numel"]
    components = {
        "transformer": traces["transformer_bytes"],
        "vae": traces["vae_bytes"],
        **{f"text:{name}": size for name, size in tracing.text_encoder_bytes(arch, dtype).items()},
        **{f"reward:{name}": r["weights"] for name, r in rewards.items()},
        "lora": lora,
        "adamw": 2 * lora,
        "ema": lora if train.ema else 0,
        "ddp_buckets": lora if world_size > 1 else 0,
        "grads": lora,
    }
    text = sum(v for k, v in components.items() if k.startswith("text:"))
    weights = sum(v for k, v in components.items() if k in ("transformer", "vae") or k.startswith("reward:"))
    resident = weights + (0 if config.offload_text_encoders else text)  # outside the encoding phase
    state = components["lora"] + components["adamw"] + components["ema"] + components["ddp_buckets"]
    sampling_buffers, update_buffers = _epoch_buffers(config, layout, traces["latent_numel"], traces["prompt_bytes"])
    allowance = 1.0 + TRANSIENT_ALLOWANCE
    rollout = math.ceil(allowance * max(traces["rollout_live"], traces["decode_live"]))
    scoring = math.ceil(allowance * max((r["live"] for r in rewards.values()), default=0))
    update = math.ceil(allowance * max(traces["update_live"], traces["update_saved"]))
    components.update(
        rollout_call_live=traces["rollout_live"], decode_call_live=traces["decode_live"], scoring_call_live=scoring,
        update_live=traces["update_live"], update_saved=traces["update_saved"],
    )
    phases = (
        PhaseMemory("encoding", weights + text, state, update_buffers, 0),
        PhaseMemory("sampling", resident, state, sampling_buffers, rollout + scoring),
        PhaseMemory("scoring", resident, state, sampling_buffers, scoring),
        PhaseMemory("update", resident, state + components["grads"], update_buffers, update),
    )
    settings = {
        "train.batch_size": train.batch_size, "train.gradient_checkpointing": train.gradient_checkpointing,
        "sample.max_states_per_call": sample.max_states_per_call, "sample.decode_chunk": sample.decode_chunk,
        "offload_text_encoders": config.offload_text_encoders, "rollout_states": rollout_states,
        "decode_states": decode_states, "train_rows": train.batch_size * traces["cfg_rows"],
        "trajectories_per_process": layout.trajectories_per_process,
    }
    return MemoryReport(arch.name, world_size, phases, components, settings)


# ------------------------------------------------------------------------------- fit and output


def _advice(report: MemoryReport, device_bytes: int) -> list[str]:
    """Settings that bring the largest phase under `device_bytes`, estimated from the linear parts."""
    phase = report.peak_phase
    excess = phase.total - device_bytes
    settings = report.settings
    advice = []
    if phase.name == "update":
        if not settings["train.gradient_checkpointing"]:
            advice.append("set train.gradient_checkpointing=True (recomputes activations; the update's activations shrink most)")
        batch = int(settings["train.batch_size"])
        fraction = max(0.0, 1.0 - excess / max(phase.activations, 1))
        smaller = [b for b in range(1, batch) if settings["trajectories_per_process"] % b == 0 and b <= batch * fraction]
        if smaller:
            advice.append(f"lower train.batch_size from {batch} to {max(smaller)} (must divide {settings['trajectories_per_process']})")
    elif phase.name in ("sampling", "scoring"):
        components = report.components
        fraction = max(0.0, 1.0 - excess / max(phase.activations, 1))
        if components["decode_call_live"] >= components["rollout_call_live"]:
            images = int(settings["decode_states"])
            advice.append(
                f"set sample.decode_chunk={max(1, int(images * fraction))} (the VAE decodes {images} images per call)"
            )
        else:
            states = int(settings["rollout_states"])
            advice.append(
                f"set sample.max_states_per_call={max(1, int(states * fraction))} (the largest rollout call holds "
                f"{states} states)"
            )
    text = sum(v for k, v in report.components.items() if k.startswith("text:"))
    if phase.name != "encoding" and not settings["offload_text_encoders"] and text:
        advice.append(f"set offload_text_encoders=True (frees {text / GIB:.1f} GiB outside the prompt encoding)")
    advice.append("or free the device of the rewards (remote reward server) and lower sample.batch_size")
    return advice


def check_fits(report: MemoryReport, device_bytes: int) -> None:
    """Raise `InsufficientMemoryError` with advice when the predicted peak exceeds `device_bytes`."""
    if report.peak <= device_bytes:
        return
    phase = report.peak_phase
    lines = "\n  - ".join(_advice(report, device_bytes))
    raise InsufficientMemoryError(
        f"predicted peak per process {report.peak / GIB:.1f} GiB ({phase.name}) exceeds the device's "
        f"{device_bytes / GIB:.1f} GiB by {(report.peak - device_bytes) / GIB:.1f} GiB. Change:\n  - {lines}"
    )


def preflight(config: ml_collections.ConfigDict, world_size: int, device: torch.device) -> MemoryReport | None:
    """The trainer's start-up check: on a CUDA `device` with `config.memory_check`, predict and `check_fits`.

    Returns the report (logged), or None where nothing was checked (CPU / MPS, or the check is off).
    Raises `InsufficientMemoryError` with advice before any weights are loaded.
    """
    device = torch.device(device)
    if device.type != "cuda" or not config.memory_check:
        return None
    report = predict_memory(config, world_size)
    total = torch.cuda.get_device_properties(device).total_memory
    logger.info(f"{format_report(report)}\ndevice memory: {total / GIB:.1f} GiB (config.memory_check=False skips this check)")
    check_fits(report, total)
    return report


def format_report(report: MemoryReport) -> str:
    """The per-phase table; the last line is `predicted peak per process: X.X GiB`."""
    header = f"{'phase':<10}{'weights':>10}{'LoRA+opt+EMA':>14}{'buffers':>10}{'activations':>13}{'total':>9}"
    rows = [f"memory preflight: {report.model}, {report.world_size} processes (GiB = 2^30 bytes)", header]
    for phase in report.phases:
        rows.append(
            f"{phase.name:<10}{phase.weights / GIB:>10.1f}{phase.training_state / GIB:>14.2f}"
            f"{phase.buffers / GIB:>10.2f}{phase.activations / GIB:>13.1f}{phase.total / GIB:>9.1f}"
        )
    rows.append("components: " + ", ".join(f"{k} {v / GIB:.2f}" for k, v in report.components.items()))
    rows.append(f"activations = (1 + {TRANSIENT_ALLOWANCE}) x traced peak; sampling includes the scoring call (async)")
    rows.append(f"predicted peak per process: {report.peak / GIB:.1f} GiB")
    return "\n".join(rows)


def load_preset(name: str) -> ml_collections.ConfigDict:
    """A named preset of `config/grpo.py` (found next to the package)."""
    path = REPO_ROOT / "config" / "grpo.py"
    spec = importlib.util.spec_from_file_location("flow_grpo_config_presets", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(name)
