"""The benchmark's models: real architectures with random weights, set up with the trainer's LoRA and update step."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from diffusers import (
    AutoencoderKL,
    AutoencoderKLFlux2,
    FlowMatchEulerDiscreteScheduler,
    Flux2KleinPipeline,
    Flux2Transformer2DModel,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    ZImagePipeline,
    ZImageTransformer2DModel,
)

from flow_grpo.training.compile import CompiledPhases, phase_budget
from flow_grpo.bench.settings import BenchmarkSettings, resolve_device
from flow_grpo.training.tracing import default_dtype
from flow_grpo.models import ModelAdapter
from flow_grpo.training.step import LossSettings, UpdateStep, add_lora
from flow_grpo.precision import mixed_precision_dtype
from flow_grpo.rewards.clip_models import PICKSCORE_DIVISOR, ClipEncoder, ClipSimilarityReward
from flow_grpo.rewards.options import resolve_dtype
from flow_grpo.rewards.preprocess import ImagePreprocess
from flow_grpo.testing.architectures_qwen import RandomTextQwenImageAdapter
from flow_grpo.testing.architectures import (
    ModelSpec,
    RandomTextFlux2KleinAdapter,
    RandomTextFluxAdapter,
    RandomTextSD3Adapter,
    RandomTextZImageAdapter,
)

__all__ = ["BenchmarkModels", "benchmark_accelerator", "build_adapter", "build_models", "build_reward"]


def _build(model_class: type[torch.nn.Module], config: Mapping[str, Any], device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """A frozen, eval-mode `model_class` from its config with random weights, created on `device` in `dtype`."""
    with torch.device(device), default_dtype(dtype):  # no float32 copy of a large model
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
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(dict(spec.scheduler))
    if spec.family in ("sd3", "flux", "z_image"):
        vae = _build(AutoencoderKL, spec.vae, device, torch.float32)
    if spec.family in ("sd3", "flux"):
        transformer_class = SD3Transformer2DModel if spec.family == "sd3" else FluxTransformer2DModel
        transformer = _build(transformer_class, spec.transformer, device, dtype)
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
    if spec.family == "flux2_klein":
        pipeline = Flux2KleinPipeline(
            transformer=_build(Flux2Transformer2DModel, spec.transformer, device, dtype), scheduler=scheduler,
            vae=_build(AutoencoderKLFlux2, spec.vae, device, torch.float32), text_encoder=None, tokenizer=None,
        )
        return RandomTextFlux2KleinAdapter(pipeline, guidance_scale=guidance_scale, text_tokens=spec.text_tokens, seed=seed)
    if spec.family == "z_image":
        pipeline = ZImagePipeline(
            transformer=_build(ZImageTransformer2DModel, spec.transformer, device, dtype), scheduler=scheduler, vae=vae,
            text_encoder=None, tokenizer=None,
        )
        return RandomTextZImageAdapter(pipeline, guidance_scale=guidance_scale, text_tokens=spec.text_tokens, seed=seed)
    if spec.family == "qwen_image":
        cls = RandomTextQwenImageAdapter
        pipeline = cls.pipeline_class(
            transformer=_build(cls.component_class("transformer"), spec.transformer, device, dtype), scheduler=scheduler,
            vae=_build(cls.component_class("vae"), spec.vae, device, torch.float32), text_encoder=None, tokenizer=None,
        )
        return cls(pipeline, guidance_scale=guidance_scale, text_tokens=spec.text_tokens, seed=seed)
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


def benchmark_accelerator(mixed_precision: str, device: torch.device, accumulation: int) -> Accelerator:
    """An accelerator as the trainer's, for `device`, that leaves the models where they are.

    accelerate keeps one process-wide state; the benchmark runs its meta copy in float32 and the
    timed models in `mixed_precision`, so a state of another precision is reset first.
    """
    shared = AcceleratorState._shared_state
    if shared and shared.get("_mixed_precision") != mixed_precision:
        AcceleratorState._reset_state()
    return Accelerator(
        cpu=device.type == "cpu",
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=accumulation,
        device_placement=False,
    )


@dataclass
class BenchmarkModels:
    """Everything the phases run on, set up as the trainer sets up its own.

    Attributes:
        adapter: the model adapter (transformer with LoRA, VAE, random prompt embeddings).
        reward: the CLIP reward.
        trainable: the LoRA parameters.
        accelerator: mixed precision (autocast, GradScaler under fp16) and gradient accumulation:
            one optimizer update per GRPO update (every micro-batch and window step).
        model: the transformer as `accelerator.prepare` returns it.
        optimizer: AdamW over `trainable`, prepared.
        update_step: backward, clipping and the optimizer step (`policy.UpdateStep`).
        loss_settings: the step kind, noise, sigma_max, clip range and KL weight of the update.
        compiled: the compiled phases (`settings.compile`), or None.
    """

    adapter: ModelAdapter
    reward: ClipSimilarityReward
    trainable: list[torch.nn.Parameter]
    accelerator: Accelerator
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    update_step: UpdateStep
    loss_settings: LossSettings
    compiled: CompiledPhases | None = None

    @property
    def device(self) -> torch.device:
        return self.adapter.device

    def autocast(self) -> contextlib.AbstractContextManager:
        """The autocast region of the phases (the trainer's `accelerator.autocast()`)."""
        return self.accelerator.autocast()


def build_models(
    spec: ModelSpec, settings: BenchmarkSettings, device: torch.device, mixed_precision: str, *, optimized: bool
) -> BenchmarkModels:
    """Build the models of `spec` on `device` with the LoRA, reward, optimizer and update step of `settings`.

    Args:
        mixed_precision: `config.mixed_precision` name of the transformer dtype and autocast
            ("no" for the meta copy: meta tensors have no values to scale or check).
        optimized: apply the run-time options that change how, not what, is computed (gradient
            checkpointing, attention backend, `torch.compile`), in the trainer's order. Off for the
            meta copy that counts the true FLOPs.
    """
    dtype = mixed_precision_dtype(mixed_precision)
    adapter = build_adapter(spec, device, dtype, guidance_scale=settings.guidance_scale, seed=settings.seed)
    transformer = adapter.transformer
    trainable = add_lora(transformer, settings.lora_rank, settings.lora_alpha, adapter.lora_target_modules, settings.seed)
    if optimized:
        if settings.gradient_checkpointing:
            transformer.enable_gradient_checkpointing()
        if settings.attention_backend:
            transformer.set_attention_backend(settings.attention_backend)
    reward = build_reward(spec, device, batch_size=settings.scored_images)
    micro_batches = math.ceil(settings.prompts / settings.micro_batch)
    accelerator = benchmark_accelerator(
        mixed_precision, resolve_device(settings), accumulation=micro_batches * settings.window_size
    )
    model, optimizer = accelerator.prepare(transformer, torch.optim.AdamW(trainable, lr=1e-4))
    compiled = None
    if optimized and settings.compile:  # the trainer's phases: rollouts, policy and reference forward
        rollout_graphs = len(settings.state_buckets) or settings.window_size + 1
        rows = settings.micro_batch * (2 if adapter.uses_cfg else 1)
        budget = phase_budget(rollout_graphs, settings.beta > 0)
        compiled = CompiledPhases(transformer, model, rows, budget, backend=settings.compile_backend)
        adapter.inference_forward = compiled.rollout
    loss_settings = LossSettings(
        step_kind=settings.step_kind,
        noise_level=settings.noise_level,
        sigma_max=float(adapter.sigmas(settings.num_steps, settings.resolution)[1]),
        clip_range=settings.clip_range,
        beta=settings.beta,
    )
    update_step = UpdateStep(accelerator, optimizer, trainable, max_grad_norm=settings.max_grad_norm)
    return BenchmarkModels(adapter, reward, trainable, accelerator, model, optimizer, update_step, loss_settings, compiled)
