"""What the benchmark runs: `BenchmarkSettings`, the presets per model size, device and dtype resolution."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from flow_grpo.run.config_checks import STEP_KINDS
from flow_grpo.precision import mixed_precision_dtype
from flow_grpo.sampling.rollouts import RolloutSettings
from flow_grpo.testing.architectures import SIZES

__all__ = [
    "DTYPE_FLAGS",
    "PHASES",
    "PHASE_TITLES",
    "BenchmarkSettings",
    "default_settings",
    "resolve_compute_dtype",
    "resolve_device",
    "resolve_mixed_precision",
]

PHASES: tuple[str, ...] = ("flow_grpo_rollout", "tp_grpo_rollout", "scoring", "update")
"""Phase names, in the order they run."""

PHASE_TITLES: dict[str, str] = {
    "flow_grpo_rollout": "Flow-GRPO rollout",
    "tp_grpo_rollout": "TP-GRPO rollout incl. decodes",
    "scoring": "scoring (CLIP, one call)",
    "update": "GRPO update over the window",
}



@dataclass(frozen=True)
class BenchmarkSettings:
    """What is benchmarked and how. `default_settings(size)` gives the presets.

    Attributes:
        size: model size, one of `SIZES`.
        prompts: trajectories per batch B (one prompt each).
        resolution: image side in pixels.
        num_steps: grid steps N of a rollout.
        window_size, window_start: the SDE window `W` and its start `s` (`s + W <= N - 1`).
        guidance_scale: CFG weight (SD3) or guidance-embedding value (FLUX).
        step_kind, noise_level: the stochastic step of the window.
        lora_rank, lora_alpha: the LoRA trained in the update (float32 parameters).
        beta: KL weight; > 0 runs the LoRA-disabled reference pass in the update.
        clip_range: PPO clip of the update's loss.
        max_grad_norm: gradient-norm clip before the optimizer step; 0 = none.
        train_batch_size: trajectories per training micro-batch; 0 = all B in one.
        gradient_checkpointing: recompute activations in the update's backward (timed models only).
        max_states_per_call: bound on states per transformer / VAE call in rollouts; 0 = none.
        state_buckets: pad each rollout transformer call to one of these state counts (timed only).
        decode_chunk: images per VAE decode call of a rollout; 0 = all in one call (the presets' `sample.decode_chunk`).
        completion_steps: TP-GRPO completion modes (`tp.completion_steps`, 0 = exact). The first is
            the `tp_grpo_rollout` phase (timed, scored and trained on); every mode's rollout is counted.
        compile: compile the transformer per phase as the trainer does (`flow_grpo.training.compile`; timed models only).
        compile_backend: dynamo backend of `compile`; "eager" only traces (CPU dry runs).
        attention_backend: diffusers attention backend of the timed transformer; "" = default.
        device: "cuda", "cpu", ...; "" = CUDA when available, else CPU.
        dtype: transformer dtype and autocast dtype: "bf16", "fp16", "fp32"; "auto" = bf16 on
            CUDA, fp32 elsewhere. The VAE stays float32 as in training (it runs under autocast).
        allow_tf32: TF32 matrix products on CUDA (the trainer's default).
        warmup, repeats: untimed and timed runs of every phase.
        matmul_size: side of the square matrix product of the ceiling; 0 = 8192 on CUDA, 1024 on CPU.
        phases: which of `PHASES` to measure.
        count_only: only count FLOPs (meta device), no timing; real sizes then run on any machine.
        count_flops: count true FLOPs on the meta device (off: times only, no rates; saves about a
            minute of CPU at real size when another run already counted the same work).
        seed: seeds the LoRA initialisation, prompt embeddings, noise and advantages.
    """

    size: str = "sd3"
    prompts: int = 9
    resolution: int = 512
    num_steps: int = 10
    window_size: int = 9
    window_start: int = 0
    guidance_scale: float = 4.5
    step_kind: str = "cps"
    noise_level: float = 0.7
    lora_rank: int = 32
    lora_alpha: int = 64
    beta: float = 1e-4
    clip_range: float = 1e-5
    max_grad_norm: float = 1.0
    train_batch_size: int = 0
    gradient_checkpointing: bool = False
    max_states_per_call: int = 0
    state_buckets: tuple[int, ...] = ()
    decode_chunk: int = 9
    completion_steps: tuple[int, ...] = (0,)
    compile: bool = False
    compile_backend: str = "inductor"
    attention_backend: str = ""
    device: str = ""
    dtype: str = "auto"
    allow_tf32: bool = True
    warmup: int = 1
    repeats: int = 3
    matmul_size: int = 0
    phases: tuple[str, ...] = PHASES
    count_only: bool = False
    count_flops: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if self.size not in SIZES:
            raise ValueError(f"size must be one of {SIZES}, got {self.size!r}")
        if self.prompts < 1 or self.num_steps < 1 or self.resolution < 1:
            raise ValueError("prompts, num_steps and resolution must be positive")
        if not (self.window_size >= 1 and 0 <= self.window_start and self.window_start + self.window_size <= self.num_steps - 1):
            raise ValueError(
                f"window [{self.window_start}, {self.window_start + self.window_size}) must be non-empty and lie "
                f"within steps 0..{self.num_steps - 2} (the last step has no noise)"
            )
        unknown = [phase for phase in self.phases if phase not in PHASES]
        if unknown or not self.phases:
            raise ValueError(f"phases must be a non-empty subset of {PHASES}, got {self.phases}")
        buckets = tuple(self.state_buckets)
        if buckets and (any(b < 1 for b in buckets) or list(buckets) != sorted(set(buckets))):
            raise ValueError(f"state_buckets must be increasing positive integers, got {buckets}")
        if buckets and self.max_states_per_call:
            raise ValueError("set state_buckets or max_states_per_call, not both (the largest bucket bounds a call)")
        if self.dtype not in DTYPE_FLAGS and self.dtype != "auto":
            raise ValueError(f"dtype must be 'auto' or one of {sorted(DTYPE_FLAGS)}, got {self.dtype!r}")
        if self.step_kind not in STEP_KINDS:
            raise ValueError(f"step_kind must be one of {STEP_KINDS}, got {self.step_kind!r}")
        if self.warmup < 0 or self.repeats < 1:
            raise ValueError("warmup must be >= 0 and repeats >= 1")
        if self.decode_chunk < 0:
            raise ValueError("decode_chunk must be >= 0 (0 = every image of a rollout in one VAE call)")
        modes = tuple(self.completion_steps)
        if not modes or any(not isinstance(k, int) or k < 0 for k in modes) or len(set(modes)) != len(modes):
            raise ValueError(f"completion_steps must be distinct integers >= 0 (0 = exact), got {modes}")
        if self.train_batch_size < 0:
            raise ValueError("train_batch_size must be >= 0 (0 = all trajectories in one micro-batch)")

    def rollout_settings(self, branches: bool, bucketed: bool = True, completion_steps: int | None = None) -> RolloutSettings:
        """The training rollout these settings describe (TP-GRPO with `branches`); `bucketed` keeps the state buckets.

        `completion_steps`: the TP-GRPO completion mode; None = the first of `self.completion_steps`.
        """
        return RolloutSettings(
            num_steps=self.num_steps,
            resolution=self.resolution,
            window_size=self.window_size,
            noise_level=self.noise_level,
            step_kind=self.step_kind,
            branches=branches,
            completion_steps=self.completion_steps[0] if completion_steps is None else completion_steps,
            max_states_per_call=self.max_states_per_call,
            state_buckets=tuple(self.state_buckets) if bucketed else (),
            decode_chunk=self.decode_chunk,
        )

    @property
    def micro_batch(self) -> int:
        """Trajectories per training micro-batch."""
        return self.train_batch_size or self.prompts

    @property
    def scored_images(self) -> int:
        """Images the scoring phase scores: every completion of the TP-GRPO rollout, `B (W + 1)`."""
        return self.prompts * (self.window_size + 1)


DTYPE_FLAGS: dict[str, str] = {"bf16": "bf16", "fp16": "fp16", "fp32": "no"}
"""`--dtype` values -> `config.mixed_precision` names (`precision.MIXED_PRECISION_DTYPES`); "auto" picks one."""

_PRESETS: dict[str, dict[str, Any]] = {
    # The settings of docs/performance.md's anchor (the SD3.5-M TP-GRPO preset).
    "sd3": {},
    # SD3.5-Large: the SD3 presets' sampling settings on the 8.1 B transformer.
    "sd3_large": {},
    # The FLUX.2-klein and Z-Image presets of config/grpo.py (Flow-Factory's recipes).
    "flux2_klein": {"num_steps": 4, "window_size": 3, "guidance_scale": 1.0, "noise_level": 0.5, "lora_rank": 64, "lora_alpha": 128},
    "z_image": {"guidance_scale": 4.0, "lora_rank": 64, "lora_alpha": 128},
    # The Qwen-Image presets (Flow-GRPO's recipe): true CFG 4, LoRA r64, 3 trajectories per process.
    "qwen_image": {"prompts": 3, "guidance_scale": 4.0, "lora_rank": 64, "lora_alpha": 128},
    # The FLUX presets of config/grpo.py: 6 steps, window 5, guidance embedding 3.5, LoRA r64.
    "flux": {"num_steps": 6, "window_size": 5, "guidance_scale": 3.5, "lora_rank": 64, "lora_alpha": 128},
    # Seconds on a CPU: the tiny models at 64 x 64 pixels (8 x 8 latents, 16 image tokens).
    "tiny": {"prompts": 3, "resolution": 64, "num_steps": 4, "window_size": 3, "lora_rank": 4, "lora_alpha": 4},
    "tiny_flux": {
        "prompts": 3, "resolution": 64, "num_steps": 4, "window_size": 3, "guidance_scale": 3.5,
        "lora_rank": 4, "lora_alpha": 4,
    },
}


def default_settings(size: str, **overrides: Any) -> BenchmarkSettings:
    """The preset of `size` with `overrides` (field name -> value) applied."""
    if size not in _PRESETS:
        raise ValueError(f"unknown size {size!r}; choose one of {SIZES}")
    return BenchmarkSettings(size=size, **{**_PRESETS[size], **overrides})


def resolve_device(settings: BenchmarkSettings) -> torch.device:
    """The timing device: `settings.device`, or CUDA when available, else the CPU."""
    if settings.device:
        return torch.device(settings.device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_mixed_precision(settings: BenchmarkSettings, device: torch.device) -> str:
    """The `config.mixed_precision` name of `settings.dtype`, with "auto" = bf16 on CUDA, fp32 ("no") elsewhere."""
    if settings.dtype == "auto":
        return "bf16" if device.type == "cuda" else "no"
    return DTYPE_FLAGS[settings.dtype]


def resolve_compute_dtype(settings: BenchmarkSettings, device: torch.device) -> torch.dtype:
    """The transformer / autocast dtype of `settings.dtype` on `device`."""
    return mixed_precision_dtype(resolve_mixed_precision(settings, device))
