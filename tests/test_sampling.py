"""Rollouts on the tiny SD3 model: seeds, chunked transformer calls, window checks.

Parity with the diffusers pipeline, log-prob recomputation and lockstep exactness are the adapter
conformance suite (tests/test_adapters.py), run for every registered family.
"""

from __future__ import annotations

import pytest
import torch

from flow_grpo.models import SD3Adapter
from flow_grpo.sampling.rollouts import draw_window_start, rollout
from tests.test_adapters import CallCounter

PROMPTS = ["a red bicycle", "Two cats on a sofa", "a lighthouse at dusk"]


def _adapter(path: str, guidance: float = 4.5) -> SD3Adapter:
    return SD3Adapter.from_pretrained(path, guidance_scale=guidance, max_sequence_length=32)


@pytest.fixture(scope="module")
def adapter(tiny_sd3_dir: str) -> SD3Adapter:
    return _adapter(tiny_sd3_dir)


def test_seeds_reproduce(adapter) -> None:
    embeds = adapter.encode_prompts(PROMPTS)

    def run(seed: int):
        return rollout(
            adapter, embeds, num_steps=5, resolution=16, window_start=0, window_size=3,
            noise_level=0.7, step_kind="cps", generator=torch.Generator().manual_seed(seed),
        )

    first, again, other = run(0), run(0), run(1)
    assert torch.equal(first.images, again.images) and torch.equal(first.next_latents, again.next_latents)
    assert torch.equal(first.log_probs, again.log_probs)
    assert not torch.allclose(first.images, other.images)
    assert not torch.allclose(first.next_latents, other.next_latents)


def test_chunked_calls_give_same_rollout(adapter) -> None:
    embeds = adapter.encode_prompts(PROMPTS)
    kwargs = dict(
        num_steps=5, resolution=16, window_start=0, window_size=3, noise_level=0.7, step_kind="cps", branches=True,
    )
    whole = rollout(adapter, embeds, generator=torch.Generator().manual_seed(0), **kwargs)
    counter = CallCounter(adapter.transformer)
    try:
        chunked = rollout(adapter, embeds, generator=torch.Generator().manual_seed(0), max_states_per_call=4, **kwargs)
    finally:
        counter.remove()
    assert max(counter.batches) <= 2 * 4 and len(counter.batches) > 5
    torch.testing.assert_close(chunked.completed_images, whole.completed_images, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(chunked.log_probs, whole.log_probs, rtol=1e-5, atol=1e-6)


def test_window_reaching_last_step_is_rejected(adapter) -> None:
    embeds = adapter.encode_prompts(PROMPTS[:1])
    with pytest.raises(ValueError, match="last step"):
        rollout(adapter, embeds, num_steps=4, resolution=16, window_start=1, window_size=3, noise_level=0.7, step_kind="cps")


def test_draw_window_start_covers_range() -> None:
    generator = torch.Generator().manual_seed(0)
    draws = {draw_window_start(generator, (1, 7), 3) for _ in range(200)}
    assert draws == {1, 2, 3, 4}
