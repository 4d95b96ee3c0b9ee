"""The trainer's training step and the benchmark's update run the same code: equal losses and gradients."""

from __future__ import annotations

import types

import torch

from flow_grpo.bench.models import build_models
from flow_grpo.bench.phases import rollout_phase, update_phase
from flow_grpo.bench.settings import default_settings
from flow_grpo.training.epoch import EpochSamples
from flow_grpo.training.step import training_step
from flow_grpo.testing.architectures import model_spec

CPU = torch.device("cpu")


def test_trainer_step_and_benchmark_update_agree() -> None:
    settings = default_settings("tiny", prompts=2, window_size=2, beta=0.05, max_grad_norm=0.0)
    models = build_models(model_spec("tiny"), settings, CPU, "no", optimized=False)
    with torch.no_grad():  # a non-zero LoRA B, so the reference forward and the KL matter
        for param in models.trainable:
            param.add_(0.01 * torch.randn(param.shape, generator=torch.Generator().manual_seed(param.numel())))
    start = [p.detach().clone() for p in models.trainable]
    prompts = models.adapter.encode_prompts(["a", "b"])
    with torch.no_grad():
        recorded = rollout_phase(models, settings, prompts, branches=True)
    advantages = torch.tensor([[1.0, -0.5], [-1.0, 0.5]])
    grads: list[list[torch.Tensor]] = []
    models.optimizer.optimizer.register_step_pre_hook(
        lambda optimizer, args, kwargs: grads.append([p.grad.detach().clone() for p in models.trainable])
    )

    # The benchmark's update phase.
    last = update_phase(models, settings, prompts, recorded, advantages)
    with torch.no_grad():
        for param, value in zip(models.trainable, start):
            param.copy_(value)

    # The trainer's step (`Trainer.train_epoch`): EpochSamples micro-batches through training_step and UpdateStep.
    samples = EpochSamples(
        prompts=prompts,
        latents=recorded.latents,
        next_latents=recorded.next_latents,
        log_probs=recorded.log_probs,
        sigmas=recorded.sigmas,
        next_sigmas=recorded.next_sigmas,
        group_ids=torch.zeros(2, dtype=torch.long),
        rewards={},
        completed_rewards=None,
    )
    unwrapped = models.accelerator.unwrap_model(models.model)
    rows = torch.arange(2)
    losses = []
    for j, batch in enumerate(samples.window_batches(rows)):
        with models.accelerator.accumulate(models.model):
            out = training_step(
                models.adapter, models.model, unwrapped, batch, advantages[rows, j],
                models.loss_settings, models.accelerator.autocast,
            )
            losses.append(out)
            models.update_step.backward(out.loss)

    assert len(grads) == 2  # one optimizer update each
    assert torch.equal(last.loss, losses[-1].loss) and torch.equal(last.kl, losses[-1].kl)
    assert losses[-1].kl.item() > 0
    for bench_grad, trainer_grad in zip(*grads):
        assert torch.equal(bench_grad, trainer_grad)
    assert any(g.abs().sum() > 0 for g in grads[0])


def test_window_batches_gather_the_prompts_once_per_micro_batch(monkeypatch):
    """A micro-batch's conditioning is gathered once for all its window steps, and every step sees those rows."""
    from flow_grpo.models import PromptEmbeds
    from flow_grpo.training.step import window_batches

    batch, window = 4, 3
    prompts = PromptEmbeds({"embeds": torch.arange(batch * 2.0).view(batch, 2)})
    recorded = types.SimpleNamespace(
        latents=torch.randn(batch, window, 5), next_latents=torch.randn(batch, window, 5),
        sigmas=torch.rand(batch, window), next_sigmas=torch.rand(batch, window), log_probs=torch.randn(batch, window),
    )
    calls = []
    select = PromptEmbeds.select
    monkeypatch.setattr(PromptEmbeds, "select", lambda self, rows: calls.append(rows) or select(self, rows))
    rows = torch.tensor([3, 1])
    steps = list(window_batches(recorded, prompts, rows))
    assert len(steps) == window and len(calls) == 1
    for j, step in enumerate(steps):
        assert torch.equal(step.prompts.tensors["embeds"], prompts.tensors["embeds"][rows])
        assert torch.equal(step.latents, recorded.latents[rows, j]) and torch.equal(step.log_probs, recorded.log_probs[rows, j])
