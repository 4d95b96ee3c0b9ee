"""TP-GRPO completion modes (`tp.completion_steps`): exactness, the one-step estimate, transformer rows, training."""

from __future__ import annotations

import pytest
import torch

from flow_grpo.algorithm.sde import euler_step
from flow_grpo.models import ModelAdapter, adapter_class
from flow_grpo.run.config_checks import ConfigError, validate_config
from flow_grpo.sampling.rollouts import completion_grid, rollout, states_per_call
from flow_grpo.training import memory
from flow_grpo.training.trainer import Trainer
from tests.test_adapters import CallCounter
from tests.test_trainer import presets, tiny_config

PROMPTS = ["a red bicycle", "Two cats on a sofa"]


@pytest.fixture(scope="module")
def adapter(tiny_sd3_dir: str) -> ModelAdapter:
    return adapter_class("sd3").from_pretrained(tiny_sd3_dir, guidance_scale=4.5, max_sequence_length=32)


def _rollout(adapter: ModelAdapter, num_steps: int, window_start: int, window_size: int, completion_steps: int, **kwargs):
    embeds = adapter.encode_prompts(PROMPTS)
    noise = adapter.initial_latents(len(PROMPTS), 16, torch.Generator().manual_seed(5))
    kwargs = {"generator": torch.Generator().manual_seed(6), **kwargs}
    return rollout(
        adapter, embeds, num_steps=num_steps, resolution=16, window_start=window_start, window_size=window_size,
        noise_level=0.7, step_kind="cps", branches=True, completion_steps=completion_steps,
        initial_latents=noise, **kwargs,
    )


def test_completion_grid_thins_the_remaining_grid_evenly() -> None:
    assert completion_grid(0, 10, 0) == list(range(11))
    assert completion_grid(3, 10, 7) == list(range(3, 11))  # k = remaining steps: every index
    assert completion_grid(3, 10, 30) == list(range(3, 11))
    assert completion_grid(0, 10, 1) == [0, 10]
    assert completion_grid(0, 10, 2) == [0, 5, 10]
    assert completion_grid(0, 10, 3) == [0, 3, 7, 10]  # 10/3 and 20/3 rounded
    assert completion_grid(5, 10, 2) == [5, 8, 10]  # 2.5 rounds half up


@pytest.mark.parametrize(
    "num_steps,window_size,window_start,expected",
    [(10, 9, 0, {0: 55, 1: 10, 2: 19, 3: 27}), (6, 4, 1, {0: 16, 1: 6, 2: 10, 4: 15, 5: 16}), (5, 1, 3, {0: 6, 1: 5, 2: 6})],
)
def test_transformer_rows_per_trajectory(num_steps, window_size, window_start, expected) -> None:
    """The SD3.5-M preset (N 10, W 9, s 0): exact 55 rows, k = 2 19, k = 1 10 (Flow-GRPO's)."""
    for k, rows in expected.items():
        assert sum(states_per_call(num_steps, window_start, window_size, k)) == rows, k


@pytest.mark.parametrize("num_steps,window_start,window_size,k", [(6, 0, 4, 1), (6, 0, 4, 2), (6, 1, 3, 3), (10, 0, 9, 2)])
def test_lockstep_calls_count_the_rows(adapter, num_steps, window_start, window_size, k) -> None:
    counter = CallCounter(adapter.transformer)
    try:
        _rollout(adapter, num_steps, window_start, window_size, k)
    finally:
        counter.remove()
    # One call per grid step, its rows the live states (CFG doubles rows, not calls); finished branches leave.
    expected = [2 * len(PROMPTS) * states for states in states_per_call(num_steps, window_start, window_size, k)]
    assert counter.batches == expected


def test_enough_steps_give_the_exact_completions_bit_for_bit(adapter) -> None:
    exact = _rollout(adapter, 6, 1, 3, 0)
    covering = _rollout(adapter, 6, 1, 3, 5)  # 5 = the remaining steps of the first fork
    assert torch.equal(covering.completed_images, exact.completed_images)
    assert torch.equal(covering.next_latents, exact.next_latents)
    # k = 3 covers the last fork (3 remaining steps): the same Euler steps as the exact branch.
    thinned = _rollout(adapter, 6, 1, 3, 3)
    assert torch.equal(thinned.completed_images[:, -2], exact.completed_images[:, -2])
    assert not torch.allclose(thinned.completed_images[:, 0], exact.completed_images[:, 0], atol=1e-4)


def test_one_step_completion_is_the_clean_estimate(adapter) -> None:
    batch = len(PROMPTS)
    result = _rollout(adapter, 6, 1, 3, 1, decode_chunk=batch)
    embeds = adapter.encode_prompts(PROMPTS)
    for j in range(3):
        x, sigma = result.latents[:, j], result.sigmas[:, j]
        velocity = adapter.velocity(x, sigma, embeds)
        assert torch.equal(result.completed_images[:, j], adapter.decode(x - sigma.view(-1, 1, 1, 1) * velocity))
        # and it is the one Euler step to sigma 0
        assert torch.equal(euler_step(velocity, x, sigma, torch.zeros(batch)), x - sigma.view(-1, 1, 1, 1) * velocity)
    torch.testing.assert_close(result.completed_images[:, -1], result.images)


def test_replayed_window_states_are_the_given_ones(adapter) -> None:
    exact = _rollout(adapter, 6, 1, 3, 0)
    replayed = _rollout(adapter, 6, 1, 3, 1, window_next_latents=exact.next_latents, generator=None)
    assert torch.equal(replayed.latents, exact.latents)
    torch.testing.assert_close(replayed.log_probs, exact.log_probs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"tp.completion_steps": -1}, "tp.completion_steps: must be a non-negative integer"),
        ({"tp.completion_steps": True}, "tp.completion_steps: must be a non-negative integer"),
    ],
)
def test_bad_completion_steps_fail_with_the_key(changes, message, tmp_path) -> None:
    config = tiny_config(str(tmp_path / "absent"), tmp_path)
    config.tp.completion_steps = changes["tp.completion_steps"]
    with pytest.raises(ConfigError, match=message):
        validate_config(config, check_paths=False)


def test_completion_steps_are_for_tp_grpo_only(tmp_path) -> None:
    config = tiny_config(str(tmp_path / "absent"), tmp_path, "tiny_flow_grpo", **{"tp.completion_steps": 2})
    with pytest.raises(ConfigError, match=r"tp.completion_steps: is 2 but algorithm='flow_grpo'.*completion_steps=0"):
        validate_config(config, check_paths=False)
    validate_config(tiny_config(str(tmp_path / "absent"), tmp_path, "tiny_tp_grpo", **{"tp.completion_steps": 2}), check_paths=False)


def test_memory_preflight_counts_the_largest_call() -> None:
    config = presets.pickscore_sd3()
    assert memory.rollout_call_states(config) == (9 * 10, 9)
    config.tp.completion_steps = 2
    assert memory.rollout_call_states(config)[0] == 9 * max(states_per_call(10, 0, 9, 2))
    config.tp.completion_steps = 1
    assert memory.rollout_call_states(config) == (9, 9)


@pytest.mark.parametrize("k", [1, 2])
def test_training_epoch_with_cheap_completions(k, tiny_sd3_real_dir, tmp_path) -> None:
    config = tiny_config(tiny_sd3_real_dir, tmp_path, "tiny_tp_grpo", **{"tp.completion_steps": k})
    trainer = Trainer(config)
    counter = CallCounter(trainer.adapter.transformer)
    try:
        samples = trainer.sample_epoch(0)
    finally:
        counter.remove()
    sample = config.sample
    assert samples.completed_rewards.shape == (samples.latents.shape[0], sample.window_size + 1)
    largest = 2 * sample.batch_size * max(
        max(states_per_call(sample.num_steps, s, sample.window_size, k)) for s in range(sample.window_range[1] - sample.window_size + 1)
    )
    assert max(counter.batches) <= largest and (k > 1 or max(counter.batches) == 2 * sample.batch_size)
    advantages, metrics = trainer.advantages(0, samples)
    metrics.update(trainer.train_epoch(0, samples, advantages))
    assert trainer.optimizer_updates == 1 and torch.isfinite(torch.tensor(metrics["train/loss"]))
