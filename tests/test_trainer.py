"""The training loop on the tiny model: ratio 1 on the first update, KL 0 at a zero LoRA, LoRA-only updates."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

from flow_grpo.algorithm.losses import kl_to_reference
from flow_grpo.training.step import adapters_disabled, policy_step
from flow_grpo.training.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("presets_for_trainer", ROOT / "config" / "grpo.py")
presets = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(presets)


def tiny_config(model_dir: str, logdir: Path, preset: str = "tiny_tp_grpo", **changes):
    config = getattr(presets, preset)()
    config.pretrained.model = model_dir
    config.logdir = str(logdir)
    config.run_name = "test"
    config.dataset = str(ROOT / "dataset" / "demo")
    config.num_epochs = 1
    config.sample.prompts_per_epoch = 2
    for key, value in changes.items():
        node = config
        *path, last = key.split(".")
        for part in path:
            node = node[part]
        setattr(node, last, value)
    return config


@pytest.mark.parametrize("preset", ["tiny_tp_grpo", "tiny_flow_grpo"])
def test_first_update_ratio_is_one_and_only_lora_changes(preset, tiny_sd3_real_dir, tmp_path) -> None:
    config = tiny_config(tiny_sd3_real_dir, tmp_path, preset, **{"train.beta": 0.01, "train.updates_per_epoch": 1})
    trainer = Trainer(config)
    named = dict(trainer.adapter.transformer.named_parameters())
    lora = {name for name, p in named.items() if p.requires_grad}
    assert lora and all("lora_" in name for name in lora)
    assert all(named[name].dtype == torch.float32 for name in lora)
    before = {name: p.detach().clone() for name, p in named.items()}

    samples = trainer.sample_epoch(0)
    # The LoRA starts at zero (B = 0): policy mean equals the reference mean, so the KL is exactly 0.
    rows = torch.arange(4)
    step = policy_step(trainer.adapter, trainer.model, next(samples.window_batches(rows)), trainer.loss_settings)
    with adapters_disabled(trainer.adapter.transformer):
        reference = policy_step(trainer.adapter, trainer.adapter.transformer, next(samples.window_batches(rows)), trainer.loss_settings)
    assert torch.equal(kl_to_reference(step.mean, reference.mean, step.std), torch.zeros(4))

    advantages, metrics = trainer.advantages(0, samples)
    assert advantages.shape == samples.log_probs.shape
    metrics.update(trainer.train_epoch(0, samples, advantages))
    assert abs(metrics["train/ratio_first"] - 1.0) < 1e-5
    assert trainer.optimizer_updates == 1

    after = dict(trainer.adapter.transformer.named_parameters())
    changed = {name for name in named if not torch.equal(before[name], after[name].detach())}
    # Only LoRA weights move; nearly all of them do (the last block's context query has no gradient
    # path: SD3 drops the context stream after it).
    assert changed <= lora
    assert len(changed) >= 0.9 * len(lora)


def test_tp_metrics_and_saved_lora_load_into_pipeline(tiny_sd3_real_dir, tmp_path) -> None:
    config = tiny_config(tiny_sd3_real_dir, tmp_path, "tiny_tp_grpo", **{"eval_freq": 1, "train.ema": True})
    history = Trainer(config).train()
    metrics = history[-1]
    for key in ("reward/avg", "reward/jpeg_compressibility", "reward/baseline_R0", "tp/tp_rate", "tp/tp_pos_before",
                "tp/tp_neg_after", "tp/mean_incremental", "train/kl", "train/clip_fraction", "eval/avg",
                "tp/tp_rate/step_0", "time/sampling", "time/scoring_wait", "data/groups_across_processes"):
        assert key in metrics, key
    run_dir = tmp_path / "test"
    assert (run_dir / "config.json").exists() and (run_dir / "metrics.jsonl").exists()
    lora_dir = run_dir / "checkpoints" / "epoch_00000" / "lora"
    assert (lora_dir / "pytorch_lora_weights.safetensors").exists()
    assert not any(name.endswith(".tmp") for name in os.listdir(lora_dir.parent))

    from diffusers import StableDiffusion3Pipeline

    pipeline = StableDiffusion3Pipeline.from_pretrained(tiny_sd3_real_dir)
    pipeline.load_lora_weights(str(lora_dir))
    assert any("lora" in name for name, _ in pipeline.transformer.named_parameters())


def test_invalid_config_fails_before_loading(tmp_path) -> None:
    config = tiny_config(str(tmp_path / "missing-model"), tmp_path)
    with pytest.raises(ValueError, match="pretrained.model"):
        Trainer(config)
