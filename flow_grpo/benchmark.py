"""Timing and FLOP counting of the GRPO phases with randomly initialised models of the real sizes.

Four phases are measured, in the order a training epoch runs them:

- `flow_grpo_rollout`: the SDE-window rollout of Flow-GRPO (N transformer calls, final decode);
- `tp_grpo_rollout`: the lockstep TP-GRPO rollout with its branches and every decode
  (`rollout(..., branches=True)`);
- `scoring`: all completed images of the TP-GRPO rollout scored with a CLIP reward in one
  on-device batched call;
- `update`: one GRPO update over the window with LoRA: for every window step the LoRA forward
  (with CFG where the model uses it), the LoRA-disabled reference pass for the KL, the loss and its
  backward, then the optimizer step (as `Trainer.train_epoch` does).

Models are built from architecture configs written here (no downloads): SD3.5-Medium and
FLUX.1-dev transformers and VAEs and a CLIP ViT-H/14 reward model, or the tiny models of
`flow_grpo.testing` for CPU runs. Text encoders are not built: prompt embeddings are random tensors
of the shapes the real encoders give.

FLOPs are the true work of a phase, counted with `torch.utils.flop_counter.FlopCounterMode` on a
copy of the models on the meta device (no memory, no compute, so real sizes count on any machine):
the same phase code runs there without compilation, state buckets or gradient checkpointing, so
padding rows and recomputation are not counted. Times are medians over repeats after warm-up,
with the device synchronised around each repeat. The rate of a phase is compared with a measured
ceiling: the rate of one large matrix product on the same device (bf16 on a GPU, float32 on CPU).
"""

from __future__ import annotations

import contextlib
import datetime
import math
import platform
import resource
import statistics
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from peft import LoraConfig
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from flow_grpo.losses import LossOutput, grpo_loss
from flow_grpo.models import FluxAdapter, ModelAdapter, PromptEmbeds, SD3Adapter
from flow_grpo.rewards.clip_models import (
    PICKSCORE_DIVISOR,
    ClipEncoder,
    ClipSimilarityReward,
)
from flow_grpo.rewards.options import resolve_dtype
from flow_grpo.rewards.preprocess import ImagePreprocess
from flow_grpo.sampling import Rollout, rollout
from flow_grpo.sde import StepOutput, stochastic_step
from flow_grpo.testing.architectures import (  # noqa: F401 (re-exported until the split)
    SD3_CLIP_TOKENS,
    SIZES,
    ModelSpec,
    RandomTextFluxAdapter,
    RandomTextSD3Adapter,
    model_spec,
)
from flow_grpo.trainer import adapters_disabled

__all__ = [
    "PHASES",
    "PHASE_TITLES",
    "SIZES",
    "BenchmarkModels",
    "BenchmarkReport",
    "BenchmarkSettings",
    "MatmulCeiling",
    "ModelSpec",
    "PhaseResult",
    "RandomTextFluxAdapter",
    "RandomTextSD3Adapter",
    "build_adapter",
    "build_models",
    "build_reward",
    "component_flops",
    "count_flops",
    "count_phase_flops",
    "default_settings",
    "format_report",
    "grpo_update",
    "matmul_ceiling",
    "model_spec",
    "rollout_phase",
    "run_benchmark",
    "run_phases",
    "scoring_phase",
    "time_phases",
]

T = TypeVar("T")

PHASES: tuple[str, ...] = ("flow_grpo_rollout", "tp_grpo_rollout", "scoring", "update")
"""Phase names, in the order they run."""

PHASE_TITLES: dict[str, str] = {
    "flow_grpo_rollout": "Flow-GRPO rollout",
    "tp_grpo_rollout": "TP-GRPO rollout incl. decodes",
    "scoring": "scoring (CLIP, one call)",
    "update": "GRPO update over the window",
}

# ----------------------------------------------------------------------------------- settings


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
        compile: `torch.compile` the transformer in place (timed models only, as the trainer does).
        attention_backend: diffusers attention backend of the timed transformer; "" = default.
        device: "cuda", "cpu", ...; "" = CUDA when available, else CPU.
        dtype: transformer dtype and autocast dtype: "bf16", "fp16", "fp32"; "auto" = bf16 on
            CUDA, fp32 elsewhere. The VAE stays float32 as in training (it runs under autocast).
        allow_tf32: TF32 matrix products on CUDA (the trainer's default).
        warmup, repeats: untimed and timed runs of every phase.
        matmul_size: side of the square matrix product of the ceiling; 0 = 8192 on CUDA, 1024 on CPU.
        phases: which of `PHASES` to measure.
        count_only: only count FLOPs (meta device), no timing; real sizes then run on any machine.
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
    compile: bool = False
    attention_backend: str = ""
    device: str = ""
    dtype: str = "auto"
    allow_tf32: bool = True
    warmup: int = 1
    repeats: int = 3
    matmul_size: int = 0
    phases: tuple[str, ...] = PHASES
    count_only: bool = False
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
        if self.dtype not in _DTYPES and self.dtype != "auto":
            raise ValueError(f"dtype must be 'auto' or one of {sorted(_DTYPES)}, got {self.dtype!r}")
        if self.warmup < 0 or self.repeats < 1:
            raise ValueError("warmup must be >= 0 and repeats >= 1")
        if self.train_batch_size < 0:
            raise ValueError("train_batch_size must be >= 0 (0 = all trajectories in one micro-batch)")

    @property
    def micro_batch(self) -> int:
        """Trajectories per training micro-batch."""
        return self.train_batch_size or self.prompts

    @property
    def scored_images(self) -> int:
        """Images the scoring phase scores: every completion of the TP-GRPO rollout, `B (W + 1)`."""
        return self.prompts * (self.window_size + 1)


_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

_PRESETS: dict[str, dict[str, Any]] = {
    # The settings of PERFORMANCE.md's anchor (the SD3.5-M TP-GRPO preset).
    "sd3": {},
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


def resolve_compute_dtype(settings: BenchmarkSettings, device: torch.device) -> torch.dtype:
    """The transformer / autocast dtype: `settings.dtype`, with "auto" = bf16 on CUDA, fp32 elsewhere."""
    if settings.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[settings.dtype]


# ------------------------------------------------------------------------------------ building


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Create floating tensors in `dtype` for the duration of the block (no float32 copy of a large model)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _build(model_class: type[torch.nn.Module], config: Mapping[str, Any], device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """A frozen, eval-mode `model_class` from its config with random weights, created on `device` in `dtype`."""
    with torch.device(device), _default_dtype(dtype):
        model = model_class.from_config(dict(config))
    # Buffers the model creates in float32 explicitly follow `dtype`, as after `from_pretrained(dtype=...)`
    # (torch's own `to`: diffusers' override only adds a warning about keeping modules in float32).
    torch.nn.Module.to(model, dtype=dtype)
    return model.requires_grad_(False).eval()


def build_adapter(
    spec: ModelSpec, device: torch.device, dtype: torch.dtype, *, guidance_scale: float, seed: int = 0
) -> ModelAdapter:
    """The model adapter of `spec` with random weights: transformer in `dtype`, VAE in float32, no text encoders.

    On the meta device nothing is allocated: the result serves FLOP counting.
    """
    transformer_class = SD3Transformer2DModel if spec.family == "sd3" else FluxTransformer2DModel
    transformer = _build(transformer_class, spec.transformer, device, dtype)
    vae = _build(AutoencoderKL, spec.vae, device, torch.float32)
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(dict(spec.scheduler))
    if spec.family == "sd3":
        pipeline = StableDiffusion3Pipeline(
            transformer=transformer, scheduler=scheduler, vae=vae,
            text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None,
        )
        return RandomTextSD3Adapter(pipeline, guidance_scale=guidance_scale, text_tokens=spec.text_tokens, seed=seed)
    if spec.family == "flux":
        pipeline = FluxPipeline(
            transformer=transformer, scheduler=scheduler, vae=vae,
            text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
        )
        return RandomTextFluxAdapter(pipeline, guidance_scale=guidance_scale, text_tokens=spec.text_tokens, seed=seed)
    raise ValueError(f"unknown model family {spec.family!r}")


def build_reward(spec: ModelSpec, device: torch.device, batch_size: int) -> ClipSimilarityReward:
    """A PickScore-style CLIP reward of `spec.reward`'s architecture with random weights.

    The model runs in the reward's "auto" dtype (float16 on CUDA, float32 elsewhere); images are
    preprocessed on the device as the CLIP-H processor does (resize and crop to
    `spec.reward_image_size`); prompts use the in-memory tokenizer of `testing.rewards`.
    """
    from transformers import CLIPConfig, CLIPModel

    from flow_grpo.testing.rewards import tiny_clip_processor

    config = CLIPConfig(**spec.reward)
    with torch.device(device):
        model = CLIPModel(config)
    if device.type == "meta":
        # transformers builds the text tower's causal mask with a data-dependent check that meta
        # tensors cannot answer; eager attention skips it and does the same matrix products.
        model.set_attn_implementation("eager")
    processor = tiny_clip_processor(spec.reward_image_size)
    dtype = resolve_dtype("auto", device, "benchmark")
    encoder = ClipEncoder(model, processor.tokenizer, ImagePreprocess.from_clip_image_processor(processor), device, dtype, batch_size)
    # PickScore's scale exp(logit_scale) / 26, read from the config (meta weights have no values).
    return ClipSimilarityReward(encoder, math.exp(config.logit_scale_init_value) / PICKSCORE_DIVISOR)


def add_lora(adapter: ModelAdapter, rank: int, alpha: int, seed: int) -> list[torch.nn.Parameter]:
    """Add the trained LoRA to the adapter's transformer as the trainer does; returns its (float32) parameters."""
    transformer = adapter.transformer
    torch.manual_seed(seed)  # the LoRA A matrices are drawn from the global generator
    transformer.add_adapter(
        LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=adapter.lora_target_modules)
    )
    trainable = [p for p in transformer.parameters() if p.requires_grad]
    for param in trainable:
        param.data = param.data.float()  # LoRA in float32, frozen base in the compute dtype
    return trainable


@dataclass
class BenchmarkModels:
    """Everything the phases run on.

    Attributes:
        adapter: the model adapter (transformer with LoRA, VAE, random prompt embeddings).
        reward: the CLIP reward.
        trainable: the LoRA parameters.
        optimizer: AdamW over `trainable`.
        autocast_dtype: dtype of the autocast region the phases run in (as the trainer's
            `accelerator.autocast()`), or None for none (float32 or the meta device).
    """

    adapter: ModelAdapter
    reward: ClipSimilarityReward
    trainable: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    autocast_dtype: torch.dtype | None

    @property
    def device(self) -> torch.device:
        return self.adapter.device

    def autocast(self) -> contextlib.AbstractContextManager:
        """The autocast region of the phases."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)


def build_models(
    spec: ModelSpec, settings: BenchmarkSettings, device: torch.device, dtype: torch.dtype, *, optimized: bool
) -> BenchmarkModels:
    """Build the models of `spec` on `device` with the LoRA, reward and optimizer of `settings`.

    Args:
        optimized: apply the run-time options that change how, not what, is computed (gradient
            checkpointing, attention backend, `torch.compile`), in the trainer's order. Off for the
            meta copy that counts the true FLOPs.
    """
    adapter = build_adapter(spec, device, dtype, guidance_scale=settings.guidance_scale, seed=settings.seed)
    trainable = add_lora(adapter, settings.lora_rank, settings.lora_alpha, settings.seed)
    transformer = adapter.transformer
    if optimized:
        if settings.gradient_checkpointing:
            transformer.enable_gradient_checkpointing()
        if settings.attention_backend:
            transformer.set_attention_backend(settings.attention_backend)
        if settings.compile:
            transformer.compile()  # in place: rollouts and the update run the same compiled code
    reward = build_reward(spec, device, batch_size=settings.scored_images)
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    autocast_dtype = dtype if dtype != torch.float32 and device.type != "meta" else None
    return BenchmarkModels(adapter, reward, trainable, optimizer, autocast_dtype)


# -------------------------------------------------------------------------------------- phases


def benchmark_texts(count: int) -> list[str]:
    """`count` distinct prompts of equal token length (the reward tokenises them without padding)."""
    return [f"benchmark prompt {i:04d}" for i in range(count)]


def _generator(device: torch.device, seed: int) -> torch.Generator:
    # Meta tensors have no generator: draw on the CPU (randn_tensor moves the values).
    return torch.Generator("cpu" if device.type == "meta" else device).manual_seed(seed)


def rollout_phase(
    models: BenchmarkModels, settings: BenchmarkSettings, prompts: PromptEmbeds, *, branches: bool, bucketed: bool = True
) -> Rollout:
    """One rollout of the batch: Flow-GRPO's window rollout, or with `branches` the lockstep TP-GRPO one.

    Args:
        bucketed: pad transformer calls to `settings.state_buckets` (off when counting true FLOPs).
    """
    with models.autocast():
        return rollout(
            models.adapter,
            prompts,
            num_steps=settings.num_steps,
            resolution=settings.resolution,
            window_start=settings.window_start,
            window_size=settings.window_size,
            noise_level=settings.noise_level,
            step_kind=settings.step_kind,
            branches=branches,
            generator=_generator(models.device, settings.seed),
            max_states_per_call=settings.max_states_per_call,
            state_buckets=tuple(settings.state_buckets) if bucketed else (),
        )


def scoring_phase(models: BenchmarkModels, images: torch.Tensor, texts: list[str]) -> torch.Tensor:
    """Score `images` (N, 3, H, W) against `texts` (N) in one call of the reward: (N,) scores."""
    if images.device.type == "meta":
        # The reward's result goes to the CPU, which a meta tensor cannot; the products are the same.
        return models.reward.encoder.cosine(images, texts)
    return models.reward(images, texts, [{} for _ in texts])


def _window_step(
    models: BenchmarkModels,
    settings: BenchmarkSettings,
    prompts: PromptEmbeds,
    samples: Rollout,
    rows: torch.Tensor,
    j: int,
    sigma_max: float,
) -> StepOutput:
    """The step distribution of window step `j` for trajectories `rows` and the log-prob of the recorded `x_{j+1}`."""
    adapter = models.adapter
    latents, sigmas = samples.latents[rows, j], samples.sigmas[rows, j]
    velocity = adapter.velocity(latents, sigmas, prompts, adapter.transformer)
    return stochastic_step(
        settings.step_kind,
        velocity,
        latents,
        sigmas,
        samples.next_sigmas[rows, j],
        settings.noise_level,
        sigma_max=sigma_max,
        next_latents=samples.next_latents[rows, j],
    )


def grpo_update(
    models: BenchmarkModels,
    settings: BenchmarkSettings,
    prompts: PromptEmbeds,
    samples: Rollout,
    advantages: torch.Tensor,
) -> LossOutput:
    """One GRPO update over the window, as `Trainer.train_epoch` runs it; returns the last step's loss.

    For each micro-batch and window step j: the LoRA forward at `x_j` and the log-prob of the
    recorded `x_{j+1}`, the reference forward with the adapters disabled (when `beta > 0`), the
    clipped loss with the KL and its backward; then gradient clipping and one optimizer step.

    Args:
        prompts: the B rows of conditioning the rollout `samples` used.
        advantages: (B, W) advantages.
    """
    transformer = models.adapter.transformer
    sigma_max = float(models.adapter.sigmas(settings.num_steps, settings.resolution)[1])
    order = torch.arange(len(prompts), device=models.device)
    transformer.train()
    out = None
    for rows in order.split(settings.micro_batch):
        row_prompts = prompts.select(rows)
        for j in range(settings.window_size):
            with models.autocast():
                step = _window_step(models, settings, row_prompts, samples, rows, j, sigma_max)
                reference_mean = None
                if settings.beta > 0:
                    with torch.no_grad(), adapters_disabled(transformer):
                        reference_mean = _window_step(models, settings, row_prompts, samples, rows, j, sigma_max).mean
            out = grpo_loss(
                step.log_prob,
                samples.log_probs[rows, j],
                advantages[rows, j],
                clip_range=settings.clip_range,
                beta=settings.beta,
                mean=step.mean,
                reference_mean=reference_mean,
                std=step.std,
            )
            out.loss.backward()
    if settings.max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(models.trainable, settings.max_grad_norm)
    models.optimizer.step()
    models.optimizer.zero_grad(set_to_none=True)
    transformer.eval()
    assert out is not None  # settings guarantee at least one window step
    return out


Measure = Callable[[str, Callable[[], T]], "T | None"]
"""`measure(phase, fn)` runs `fn` (once or more) and records what it measures; returns the last
result, or None when the phase could not run (e.g. out of memory)."""


def run_phases(models: BenchmarkModels, settings: BenchmarkSettings, measure: Measure, *, bucketed: bool = True) -> None:
    """Run the phases of `settings.phases` in training order, each through `measure`.

    The TP-GRPO rollout's result feeds scoring (its `B (W + 1)` completed images) and the update
    (its window states, with random advantages); it runs once unmeasured when only those are asked.

    Args:
        bucketed: pad rollout transformer calls to `settings.state_buckets` (off when counting true FLOPs).
    """
    texts = benchmark_texts(settings.prompts)
    prompts = models.adapter.encode_prompts(texts)

    def tp_rollout() -> Rollout:
        return rollout_phase(models, settings, prompts, branches=True, bucketed=bucketed)

    if "flow_grpo_rollout" in settings.phases:
        measure("flow_grpo_rollout", lambda: rollout_phase(models, settings, prompts, branches=False, bucketed=bucketed))
    needs_rollout = "scoring" in settings.phases or "update" in settings.phases
    if "tp_grpo_rollout" in settings.phases:
        tp = measure("tp_grpo_rollout", tp_rollout)
    else:
        tp = tp_rollout() if needs_rollout else None
    if tp is None:
        return  # nothing asked of it, or it failed: nothing to score or train on
    if "scoring" in settings.phases:
        images = tp.completed_images.flatten(0, 1)
        per_image = [text for text in texts for _ in range(settings.window_size + 1)]
        measure("scoring", lambda: scoring_phase(models, images, per_image))
    if "update" in settings.phases:
        generator = torch.Generator().manual_seed(settings.seed + 2)
        advantages = torch.randn(settings.prompts, settings.window_size, generator=generator).to(models.device)
        measure("update", lambda: grpo_update(models, settings, prompts, tp, advantages))


# -------------------------------------------------------------------------------- measurement


@contextlib.contextmanager
def _counting_flops() -> Iterator[FlopCounterMode]:
    """A FLOP counter with attention in its math form (matrix products the counter sees on every device).

    torch's counter knows the fused attention kernels of CUDA but not the CPU one, whose products
    it would miss; on the meta device attention takes the math form anyway. The count is the same.
    """
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        yield counter


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of the operations `fn` runs (matrix products, convolutions, attention), forward and backward."""
    with _counting_flops() as counter:
        fn()
    return int(counter.get_total_flops())


def count_phase_flops(models: BenchmarkModels, settings: BenchmarkSettings) -> dict[str, int]:
    """FLOPs of every phase in `settings.phases` (true work: no bucket padding), run on `models`.

    `models` are normally on the meta device; on a real device the count is the same.
    """
    flops: dict[str, int] = {}

    def measure(phase: str, fn: Callable[[], T]) -> T:
        with _counting_flops() as counter:
            result = fn()
        flops[phase] = int(counter.get_total_flops())
        return result

    run_phases(models, settings, measure, bucketed=False)
    return flops


def component_flops(models: BenchmarkModels, settings: BenchmarkSettings) -> dict[str, int]:
    """FLOPs of single model calls at `settings.resolution`, the LoRA disabled.

    Returns:
        `transformer_forward_per_row`: one transformer forward of one batch row (a CFG state is
        two rows); `vae_decode_per_image`; `reward_per_image`: the reward's image tower on one image.
    """
    adapter = models.adapter
    latents = adapter.initial_latents(1, settings.resolution, _generator(models.device, settings.seed))
    prompts = adapter.encode_prompts(benchmark_texts(1))
    sigma = torch.ones(1, device=models.device)
    rows_per_state = 2 if adapter.uses_cfg else 1
    with torch.no_grad(), adapters_disabled(adapter.transformer):
        transformer = count_flops(lambda: adapter.velocity(latents, sigma, prompts)) // rows_per_state
    vae = count_flops(lambda: adapter.decode(latents))
    image = torch.zeros(1, 3, settings.resolution, settings.resolution, device=models.device)
    reward = count_flops(lambda: models.reward.encoder.image_embeddings(image))
    return {"transformer_forward_per_row": transformer, "vae_decode_per_image": vae, "reward_per_image": reward}


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); a no-op on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], T], device: torch.device, *, warmup: int, repeats: int) -> tuple[list[float], list[float], T]:
    """Run `fn` `warmup` times untimed, then `repeats` times timed with the device synchronised around each.

    Returns:
        (warm-up seconds, timed seconds, the last result).
    """
    warmup_times, times = [], []
    result: T
    for count, bucket in ((warmup, warmup_times), (repeats, times)):
        for _ in range(count):
            synchronize(device)
            start = time.perf_counter()
            result = fn()
            synchronize(device)
            bucket.append(time.perf_counter() - start)
    return warmup_times, times, result


@dataclass
class PhaseResult:
    """Measurements of one phase.

    Attributes:
        name: phase name (see `PHASES`).
        flops: true FLOPs of one run, counted on the meta device.
        seconds: median of the timed runs; None when only counted or when it failed.
        times: every timed run, seconds.
        warmup_times: the untimed runs, seconds (the first includes any compilation).
        peak_memory_bytes: CUDA: `max_memory_allocated` during the phase (weights included);
            CPU: the process's maximum resident set size so far; None when only counted.
        ceiling_flops_per_second: the matrix-product ceiling the rate is compared with.
        error: why the phase has no time (e.g. out of memory), else None; detail: the message.
    """

    name: str
    flops: int
    seconds: float | None = None
    times: list[float] = field(default_factory=list)
    warmup_times: list[float] = field(default_factory=list)
    peak_memory_bytes: int | None = None
    ceiling_flops_per_second: float | None = None
    error: str | None = None
    detail: str = ""

    @property
    def flops_per_second(self) -> float | None:
        """True FLOP/s: counted FLOPs over the median time."""
        return self.flops / self.seconds if self.seconds else None

    @property
    def fraction_of_ceiling(self) -> float | None:
        """`flops_per_second` over the matrix-product ceiling."""
        if self.flops_per_second is None or not self.ceiling_flops_per_second:
            return None
        return self.flops_per_second / self.ceiling_flops_per_second

    def to_dict(self) -> dict[str, Any]:
        rate = self.flops_per_second
        return {
            **asdict(self),
            "title": PHASE_TITLES[self.name],
            "tflops": self.flops / 1e12,
            "tflops_per_second": rate / 1e12 if rate is not None else None,
            "fraction_of_ceiling": self.fraction_of_ceiling,
        }


def peak_memory(device: torch.device) -> int:
    """CUDA: bytes allocated at peak since the last reset; CPU: the process's maximum resident set size."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # kilobytes on Linux


def time_phases(models: BenchmarkModels, settings: BenchmarkSettings) -> dict[str, PhaseResult]:
    """Time every phase of `settings.phases` on `models` (FLOPs left 0 for the caller to fill in).

    A phase that runs out of CUDA memory is recorded with its error and the others still run
    (scoring and the update need the TP-GRPO rollout's result).
    """
    device = models.device
    results: dict[str, PhaseResult] = {}

    def measure(phase: str, fn: Callable[[], T]) -> T | None:
        result = results[phase] = PhaseResult(name=phase, flops=0)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        try:
            result.warmup_times, result.times, output = time_call(fn, device, warmup=settings.warmup, repeats=settings.repeats)
        except torch.cuda.OutOfMemoryError as error:
            result.error = "out of memory"
            result.peak_memory_bytes = peak_memory(device)
            result.detail = str(error).splitlines()[0] if str(error) else ""
            models.optimizer.zero_grad(set_to_none=True)
            return None
        result.seconds = statistics.median(result.times)
        result.peak_memory_bytes = peak_memory(device)
        return output

    run_phases(models, settings, measure)
    for phase in settings.phases:
        results.setdefault(phase, PhaseResult(name=phase, flops=0, error="not run: the TP-GRPO rollout failed"))
    return results


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


# ------------------------------------------------------------------------------------- report


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
    dtype = resolve_compute_dtype(settings, device)
    spec = model_spec(settings.size)
    meta = build_models(spec, settings, torch.device("meta"), dtype, optimized=False)
    components = component_flops(meta, settings)
    flops = count_phase_flops(meta, settings)
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
        models = build_models(spec, settings, device, dtype, optimized=True)
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
            f"gradient_checkpointing={s.gradient_checkpointing}; median of {s.repeats} after {s.warmup} warm-up"
        ),
        (
            f"FLOPs per call: transformer forward {_si(components['transformer_forward_per_row'])} per row, "
            f"VAE decode {_si(components['vae_decode_per_image'])} per image, "
            f"reward {_si(components['reward_per_image'])} per image"
        ),
    ]
    if report.ceiling is not None:
        c = report.ceiling
        lines.append(f"matmul ceiling: {c.size}^3 {c.dtype} at {_si(c.flops_per_second, 'FLOP/s')}")
    lines.append(f"peak memory: {report.memory}")
    header = ("phase", "seconds", "first run s", "FLOP", "FLOP/s", "of matmul", "peak memory")
    rows = []
    for phase in report.phases:
        fraction = phase.fraction_of_ceiling
        memory = f"{phase.peak_memory_bytes / 1e9:.2f} GB" if phase.peak_memory_bytes is not None else "n/a"
        seconds = f"{phase.seconds:.3f}" if phase.seconds is not None else (phase.error or "-")
        rows.append(
            (
                _phase_title(phase, s),
                seconds,
                f"{phase.warmup_times[0]:.3f}" if phase.warmup_times else "-",
                _si(phase.flops),
                _si(phase.flops_per_second),
                f"{100 * fraction:.1f}%" if fraction is not None else "-",
                memory,
            )
        )
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    table = [
        "| " + " | ".join(cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i]) for i, cell in enumerate(row)) + " |"
        for row in (header, *rows)
    ]
    table.insert(1, "|" + "|".join("-" * (w + 2) if i == 0 else "-" * (w + 1) + ":" for i, w in enumerate(widths)) + "|")
    return "\n".join(lines + [""] + table)
