"""Switchable speed-ups give the results of the plain path (within float rounding)."""

from __future__ import annotations

import pytest
import torch

from flow_grpo.config_checks import ConfigError, validate_config
from flow_grpo.models import SD3Adapter
from flow_grpo.sampling import rollout
from flow_grpo.trainer import Trainer
from tests.test_sampling import PROMPTS, _CountingTransformer
from tests.test_trainer import tiny_config


@pytest.fixture(scope="module")
def adapter(tiny_sd3_dir: str) -> SD3Adapter:
    return SD3Adapter.from_pretrained(tiny_sd3_dir, guidance_scale=4.5, max_sequence_length=32)


KWARGS = dict(num_steps=5, resolution=16, window_start=0, window_size=3, noise_level=0.7, step_kind="cps", branches=True)


def test_state_buckets_pad_calls_without_changing_the_rollout(adapter) -> None:
    embeds = adapter.encode_prompts(PROMPTS)
    plain = rollout(adapter, embeds, generator=torch.Generator().manual_seed(0), **KWARGS)
    counter = _CountingTransformer(adapter.transformer)
    bucketed = rollout(
        adapter, embeds, generator=torch.Generator().manual_seed(0), state_buckets=(4, 8), transformer=counter, **KWARGS
    )
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


def test_compiled_sampling_matches_eager_and_first_ratio_is_one(tiny_sd3_dir, tmp_path) -> None:
    # One bucket: the lockstep's growing batch (8 ... 24 states) compiles once for sampling.
    changes = {"sample.prompts_per_epoch": 2, "sample.window_size": 2, "sample.state_buckets": (24,)}
    eager = Trainer(tiny_config(tiny_sd3_dir, tmp_path / "eager", **changes))
    compiled = Trainer(tiny_config(tiny_sd3_dir, tmp_path / "compiled", compile=True, **changes))
    expected, got = eager.sample_epoch(0), compiled.sample_epoch(0)
    torch.testing.assert_close(got.next_latents, expected.next_latents, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got.log_probs, expected.log_probs, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got.completed_rewards, expected.completed_rewards, rtol=1e-4, atol=1e-3)
    advantages, _ = compiled.advantages(0, got)
    metrics = compiled.train_epoch(0, got, advantages)
    # Sampling and training ran the same compiled code: the importance ratio starts at 1.
    assert abs(metrics["train/ratio_first"] - 1.0) < 1e-5
