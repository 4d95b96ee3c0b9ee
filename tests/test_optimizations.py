"""Switchable speed-ups give the results of the plain path (within float rounding)."""

from __future__ import annotations

import pytest
import torch

from flow_grpo.training.compile import default_state_buckets, rollout_call_sizes
from flow_grpo.run.config_checks import ConfigError, validate_config
from flow_grpo.models import SD3Adapter
from flow_grpo.sampling.rollouts import rollout
from flow_grpo.training.trainer import Trainer
from tests.test_adapters import CallCounter
from tests.test_sampling import PROMPTS
from tests.test_trainer import tiny_config


@pytest.fixture(scope="module")
def adapter(tiny_sd3_dir: str) -> SD3Adapter:
    return SD3Adapter.from_pretrained(tiny_sd3_dir, guidance_scale=4.5, max_sequence_length=32)


KWARGS = dict(num_steps=5, resolution=16, window_start=0, window_size=3, noise_level=0.7, step_kind="cps", branches=True)


def test_state_buckets_pad_calls_without_changing_the_rollout(adapter) -> None:
    embeds = adapter.encode_prompts(PROMPTS)
    plain = rollout(adapter, embeds, generator=torch.Generator().manual_seed(0), **KWARGS)
    counter = CallCounter(adapter.transformer)
    try:
        bucketed = rollout(adapter, embeds, generator=torch.Generator().manual_seed(0), state_buckets=(4, 8), **KWARGS)
    finally:
        counter.remove()
    # Live states per step: 3, 6, 9, 12, 12 -> calls padded to 4, 8, 8+4, 8+4, 8+4 states (x2 for CFG).
    assert counter.batches == [8, 16, 16, 8, 16, 8, 16, 8]
    torch.testing.assert_close(bucketed.completed_images, plain.completed_images, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bucketed.log_probs, plain.log_probs, rtol=1e-5, atol=1e-6)


def test_attention_backend_matches_default(adapter) -> None:
    embeds = adapter.encode_prompts(PROMPTS)
    plain = rollout(adapter, embeds, generator=torch.Generator().manual_seed(0), **KWARGS)
    adapter.transformer.set_attention_backend("_native_math")
    try:
        other = rollout(adapter, embeds, generator=torch.Generator().manual_seed(0), **KWARGS)
    finally:
        adapter.transformer.reset_attention_backend()
    torch.testing.assert_close(other.completed_images, plain.completed_images, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "key,value,message",
    [
        ("sample.state_buckets", (8, 4), "increasing positive integers"),
        ("attention_backend", "fastest", "unknown backend 'fastest'"),
    ],
)
def test_bad_optimisation_settings_are_rejected(key, value, message, tmp_path) -> None:
    config = tiny_config("unused", tmp_path, **{key: value})
    with pytest.raises(ConfigError, match=message):
        validate_config(config, check_paths=False)


def test_default_buckets_pad_at_most_ten_percent() -> None:
    # SD3.5-M TP-GRPO preset: 9 per batch, window 9: calls of 9, 18, ..., 90 states (495 in all).
    buckets = default_state_buckets(9, 9, branches=True)
    sizes = rollout_call_sizes(9, 9, branches=True)
    padded = sum(min(b for b in buckets if b >= n) for n in sizes)
    assert buckets == (18, 36, 54, 72, 90) and (sum(sizes), padded) == (495, 540)
    assert default_state_buckets(9, 9, branches=False) == (9,)
    assert default_state_buckets(3, 5, branches=True)[-1] == 18


def test_compiled_epochs_count_graphs_and_keep_the_ratio_at_one(tiny_sd3_dir, tmp_path) -> None:
    # Two epochs with sampling, training with the KL reference, and evaluation, all compiled:
    # one bucket for sampling and evaluation, one micro-batch shape for policy and reference.
    changes = {
        "num_epochs": 2, "eval_freq": 1, "log_images": 0, "train.beta": 0.01, "sample.window_size": 2,
        "sample.state_buckets": (24,), "sample.eval_batch_size": 4,
    }
    trainer = Trainer(tiny_config(tiny_sd3_dir, tmp_path, compile=True, **changes))
    history = trainer.train()
    expected = {"rollout": 1, "policy": 1, "reference": 1}
    # Regional: the tiny transformer's two blocks are two kinds (the last is context-pre-only).
    kinds = trainer.compiled.graphs_by_kind()
    assert list(kinds) == ["JointTransformerBlock", "JointTransformerBlock/2"]
    assert trainer.compiled.graphs() == expected and all(phases == expected for phases in kinds.values())
    assert [m["compile/graphs"] for m in history] == [6.0, 6.0]  # nothing recompiled in epoch 2
    # Sampling and training ran compiled code: the importance ratio starts at 1.
    assert abs(history[0]["train/ratio_first"] - 1.0) < 1e-5
