"""The trainer drops trajectories with a zero advantage at every step and averages the loss over the kept ones."""

from __future__ import annotations

import torch

from flow_grpo.training.step import training_step
from flow_grpo.training.trainer import Trainer
from tests.test_trainer import tiny_config


def test_tied_group_is_dropped_and_the_kept_gradient_is_the_mean_over_kept(tiny_sd3_dir, tmp_path) -> None:
    # 3 groups of 4 on one process, 3 micro-batches of 4 configured.
    config = tiny_config(
        tiny_sd3_dir,
        tmp_path,
        "tiny_flow_grpo",
        **{
            "sample.prompts_per_epoch": 3,
            "sample.batch_size": 4,
            "train.batch_size": 4,
            "train.updates_per_epoch": 1,
            "train.max_grad_norm": 0.0,
        },
    )
    trainer = Trainer(config)
    samples = trainer.sample_epoch(0)
    tied = samples.group_ids == samples.group_ids[0]
    samples.rewards["avg"][tied] = 0.5  # every member of this group scores the same
    advantages, _ = trainer.advantages(0, samples)
    assert torch.equal(advantages[tied], torch.zeros_like(advantages[tied]))
    assert (advantages[~tied] != 0).any(dim=1).all()

    trained: list[torch.Tensor] = []
    window_batches = samples.window_batches
    samples.window_batches = lambda rows: trained.append(rows.clone()) or window_batches(rows)
    gradients: list[torch.Tensor] = []
    step = trainer.optimizer.step

    def recording_step(*args, **kwargs):
        gradients.append(torch.cat([(torch.zeros_like(p) if p.grad is None else p.grad).flatten().clone() for p in trainer.trainable]))
        return step(*args, **kwargs)

    trainer.optimizer.step = recording_step
    initial = [p.detach().clone() for p in trainer.trainable]
    metrics = trainer.train_epoch(0, samples, advantages)

    # 8 informative rows do not split into 3 micro-batches: one tied row is re-added (9 = 3 x 3).
    window = config.sample.window_size
    micro_batches = trained
    assert [len(rows) for rows in micro_batches] == [3, 3, 3]
    kept = torch.cat(micro_batches)
    assert len(set(kept.tolist())) == 9
    assert set(torch.nonzero(~tied).flatten().tolist()) <= set(kept.tolist())
    assert int(tied[kept].sum()) == 1
    assert metrics["train/kept_fraction"] == 9 / 12
    assert len(gradients) == 1 and trainer.optimizer_updates == 1

    # The update's gradient is that of the mean loss over the kept trajectories, taken directly.
    with torch.no_grad():
        for param, value in zip(trainer.trainable, initial):
            param.copy_(value)
    trainer.optimizer.zero_grad()
    trainer.model.train()
    unwrapped = trainer.accelerator.unwrap_model(trainer.model)
    for j, batch in enumerate(window_batches(kept)):
        out = training_step(trainer.adapter, trainer.model, unwrapped, batch, advantages[kept, j], trainer.loss_settings)
        (out.loss / window).backward()
    direct = torch.cat([(torch.zeros_like(p) if p.grad is None else p.grad).flatten() for p in trainer.trainable])
    assert direct.norm() > 0
    assert (gradients[0] - direct).norm() <= 1e-4 * direct.norm()
