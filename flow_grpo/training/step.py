"""The GRPO training step: the loss of one micro-batch of recorded window steps, and the optimizer update.

`training_step` computes the loss terms of one window step for a micro-batch of trajectories:
the policy forward through the trainable (LoRA) model and the log-prob of the recorded next
state under `sde.stochastic_step`, the LoRA-disabled reference forward when `beta > 0`, and the
clipped loss with the KL (`losses.grpo_loss`). `UpdateStep` turns the losses into optimizer
updates: backward through accelerate (loss scaled by the accumulation steps, GradScaler under
fp16), a non-finite check per update, gradient clipping, the optimizer and EMA steps. The trainer
and the benchmark (`flow_grpo.bench`) both run these, so the benchmark times the trainer's step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import ml_collections
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from peft import LoraConfig
from peft.tuners.lora import LoraLayer

from flow_grpo.training.ema import ParameterEMA
from flow_grpo.algorithm.losses import LossOutput, grpo_loss
from flow_grpo.models import ModelAdapter, PromptEmbeds
from flow_grpo.algorithm.sde import StepOutput, stochastic_step

__all__ = ["LossSettings", "UpdateStep", "WindowBatch", "adapters_disabled", "add_lora", "loss_settings", "policy_step", "training_step", "window_batches"]


def add_lora(transformer: torch.nn.Module, rank: int, alpha: int, targets: list[str], seed: int) -> list[torch.nn.Parameter]:
    """Add a gaussian-initialised LoRA (B = 0) to the frozen `transformer`; returns its parameters, cast to float32.

    `seed` seeds every global generator first (the LoRA A matrices are drawn from torch's), so
    the same seed gives the same LoRA. The frozen base keeps its dtype. A base in half precision
    runs under autocast (the trainer's and the benchmark's autocast regions), which casts each LoRA
    projection's input and the float32 LoRA weights to the compute dtype itself; peft's own cast of
    the input to the LoRA's float32, which autocast undoes at once, is turned off (it copied every
    projected activation twice, once in float32; the results are the same bit for bit). Called
    outside autocast, such a LoRA fails with a dtype mismatch instead of running in float32.
    """
    transformer.requires_grad_(False)
    set_seed(seed)
    transformer.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=targets))
    trainable = [p for p in transformer.parameters() if p.requires_grad]
    for param in trainable:
        param.data = param.data.float()  # LoRA in float32, frozen base in the compute dtype
    if transformer.dtype != torch.float32:
        for module in transformer.modules():
            if isinstance(module, LoraLayer):
                module.cast_input_dtype_enabled = False
    return trainable


@contextlib.contextmanager
def adapters_disabled(transformer: torch.nn.Module) -> Iterator[None]:
    """The LoRA-disabled reference model for the duration of the block."""
    transformer.disable_adapters()
    try:
        yield
    finally:
        transformer.enable_adapters()


@dataclass(frozen=True)
class LossSettings:
    """How a recorded window step is scored and its loss formed.

    Attributes:
        step_kind, noise_level: the stochastic step the rollout used ("sde" or "cps", a).
        sigma_max: the largest sigma below 1 of the rollout's grid (the SDE step's noise scale).
        clip_range: PPO clip of the likelihood ratio.
        beta: KL weight; > 0 runs the LoRA-disabled reference forward.
    """

    step_kind: str
    noise_level: float
    sigma_max: float
    clip_range: float
    beta: float


def loss_settings(config: ml_collections.ConfigDict, sigma_max: float) -> LossSettings:
    """The `LossSettings` of a training config; `sigma_max` is the largest sigma below 1 of the rollout's grid."""
    return LossSettings(
        step_kind=config.sample.step_kind,
        noise_level=config.sample.noise_level,
        sigma_max=sigma_max,
        clip_range=config.train.clip_range,
        beta=config.train.beta,
    )


@dataclass
class WindowBatch:
    """One window step j of a micro-batch of b recorded trajectories.

    Attributes:
        prompts: the b rows of conditioning the rollout used.
        latents, next_latents: (b, ...) the states x_j and the recorded x_{j+1}.
        sigmas, next_sigmas: (b,) the noise levels of x_j and x_{j+1}.
        log_probs: (b,) the rollout's log-probs of x_{j+1} (the old policy).
    """

    prompts: PromptEmbeds
    latents: torch.Tensor
    next_latents: torch.Tensor
    sigmas: torch.Tensor
    next_sigmas: torch.Tensor
    log_probs: torch.Tensor

    @classmethod
    def select(cls, recorded: Any, prompts: PromptEmbeds, rows: torch.Tensor, j: int) -> WindowBatch:
        """Window step `j` of trajectories `rows` (b,) of `recorded` (a `Rollout` or `EpochSamples`: (B, W, ...)
        `latents`, `next_latents`, (B, W) `sigmas`, `next_sigmas`, `log_probs`); `prompts` is the b rows'
        conditioning, already gathered (see `window_batches`)."""
        return cls(
            prompts=prompts,
            latents=recorded.latents[rows, j],
            next_latents=recorded.next_latents[rows, j],
            sigmas=recorded.sigmas[rows, j],
            next_sigmas=recorded.next_sigmas[rows, j],
            log_probs=recorded.log_probs[rows, j],
        )


def window_batches(recorded: Any, prompts: PromptEmbeds, rows: torch.Tensor) -> Iterator[WindowBatch]:
    """The window steps `j = 0 ... W - 1` of the micro-batch `rows` (b,) of `recorded` (see `WindowBatch.select`),
    conditioned on `prompts` (B rows): the micro-batch's conditioning is gathered once, not once per step."""
    rows_prompts = prompts.select(rows)
    for j in range(recorded.latents.shape[1]):
        yield WindowBatch.select(recorded, rows_prompts, rows, j)


def policy_step(adapter: ModelAdapter, model: Callable[..., Any], batch: WindowBatch, settings: LossSettings) -> StepOutput:
    """The step distribution at `batch.latents` under `model` (module or compiled callable), and the log-prob (b,)
    of the recorded next state."""
    velocity = adapter.velocity(batch.latents, batch.sigmas, batch.prompts, model)
    return stochastic_step(
        settings.step_kind,
        velocity,
        batch.latents,
        batch.sigmas,
        batch.next_sigmas,
        settings.noise_level,
        sigma_max=settings.sigma_max,
        next_latents=batch.next_latents,
    )


def training_step(
    adapter: ModelAdapter,
    model: torch.nn.Module,
    unwrapped: torch.nn.Module,
    batch: WindowBatch,
    advantages: torch.Tensor,
    settings: LossSettings,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    compiled: Any = None,
) -> LossOutput:
    """The loss terms of one window step of a micro-batch (no backward).

    Args:
        model: the trainable model the policy forward runs through (possibly DDP-wrapped).
        unwrapped: the same model unwrapped; its LoRA is disabled for the reference forward.
        advantages: (b,) advantages of the micro-batch at this window step.
        autocast: the autocast region of the forwards (the loss is formed outside it).
        compiled: `flow_grpo.training.compile.CompiledPhases` whose `policy` / `reference` callables run
            instead of `model` / `unwrapped`; None = eager.
    """
    policy = compiled.policy if compiled is not None else model
    reference = compiled.reference if compiled is not None else unwrapped
    with autocast():
        step = policy_step(adapter, policy, batch, settings)
        reference_mean = None
        if settings.beta > 0:
            with torch.no_grad(), adapters_disabled(unwrapped):
                reference_mean = policy_step(adapter, reference, batch, settings).mean
    return grpo_loss(
        step.log_prob,
        batch.log_probs,
        advantages,
        clip_range=settings.clip_range,
        beta=settings.beta,
        mean=step.mean,
        reference_mean=reference_mean,
        std=step.std,
    )


class UpdateStep:
    """Backward of each loss and, at every accumulation boundary, one optimizer update.

    Call `backward(loss)` inside `accelerator.accumulate(model)`. At a boundary the summed
    non-finite flag is reduced over processes (all decide alike); a non-finite update calls
    `on_nonfinite` and is skipped, otherwise the gradients are clipped to `max_grad_norm` (0 =
    no clipping), the optimizer steps and the EMA follows. Gradients are zeroed either way.
    Meta tensors (FLOP counting) carry no values: the non-finite check is skipped for them.
    """

    def __init__(
        self,
        accelerator: Accelerator,
        optimizer: torch.optim.Optimizer,
        trainable: list[torch.nn.Parameter],
        *,
        max_grad_norm: float,
        ema: ParameterEMA | None = None,
    ) -> None:
        self.accelerator = accelerator
        self.optimizer = optimizer
        self.trainable = trainable
        self.max_grad_norm = max_grad_norm
        self.ema = ema
        self.updates = 0
        self._nonfinite: torch.Tensor | None = None

    def backward(self, loss: torch.Tensor, on_nonfinite: Callable[[], None] | None = None) -> bool:
        """Backward of `loss` (a scalar); returns True when an optimizer update was applied.

        `on_nonfinite` is called when the update is skipped for a NaN/inf loss (it may raise).
        """
        accelerator = self.accelerator
        accelerator.backward(loss)
        flag = (~torch.isfinite(loss.detach())).float()
        self._nonfinite = flag if self._nonfinite is None else self._nonfinite + flag
        if not accelerator.sync_gradients:
            return False
        nonfinite, self._nonfinite = self._nonfinite, None
        applied = False
        if nonfinite.device.type != "meta" and accelerator.reduce(nonfinite, "sum").item() > 0:
            if on_nonfinite is not None:
                on_nonfinite()
        else:
            if self.max_grad_norm > 0:
                accelerator.clip_grad_norm_(self.trainable, self.max_grad_norm)
            self.optimizer.step()
            self.updates += 1
            if self.ema is not None:
                self.ema.step(self.updates)
            applied = True
        self.optimizer.zero_grad()
        return applied
