"""Tests for the reward registry, the JPEG rewards, MultiReward and AsyncScorer."""

from __future__ import annotations

import io
import threading

import pytest
import torch
from PIL import Image

from flow_grpo.rewards import (
    AsyncScorer,
    MultiReward,
    available_rewards,
    build_reward,
    check_reward_names,
    jpeg_compressibility,
    jpeg_incompressibility,
    register_reward,
)
from flow_grpo.rewards import registry


def _images(num: int = 4, size: int = 32, seed: int = 0) -> torch.Tensor:
    """(num, 3, size, size) random images in [0, 1]."""
    return torch.rand(num, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _inputs(num: int = 4) -> tuple[torch.Tensor, list[str], list[dict]]:
    return _images(num), [f"prompt {i}" for i in range(num)], [{"index": i} for i in range(num)]


@pytest.fixture
def fake_rewards(monkeypatch):
    """Register two test rewards for one test: mean brightness and a per-sample metadata value."""
    calls: list[tuple[torch.device, dict]] = []

    def make_brightness(device, options):
        calls.append((device, dict(options)))
        scale = options.get("scale", 1.0)
        return lambda images, prompts, metadata: scale * images.float().mean(dim=(1, 2, 3)).cpu()

    def make_metadata_value(device, options):
        return lambda images, prompts, metadata: torch.tensor([float(m["index"]) for m in metadata])

    monkeypatch.setitem(registry._REGISTRY, "test_brightness", make_brightness)
    monkeypatch.setitem(registry._REGISTRY, "test_index", make_metadata_value)
    return calls


def test_jpeg_rewards_are_registered():
    assert {"jpeg_compressibility", "jpeg_incompressibility"} <= set(available_rewards())


def test_flat_image_is_more_compressible_than_noise():
    flat = torch.full((1, 3, 64, 64), 0.5)
    noise = _images(1, size=64)
    images = torch.cat([flat, noise])
    scores = jpeg_compressibility(images, ["a", "b"], [{}, {}])
    assert scores[0] > scores[1]
    assert (scores < 0).all()


def test_incompressibility_is_minus_compressibility():
    images, prompts, metadata = _inputs()
    compress = jpeg_compressibility(images, prompts, metadata)
    incompress = jpeg_incompressibility(images, prompts, metadata)
    torch.testing.assert_close(incompress, -compress)
    assert (incompress > 0).all()


def test_jpeg_score_is_file_size_in_kilobytes():
    image = _images(1, size=48)
    pixels = (image[0] * 255).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=95)
    expected = len(buffer.getvalue()) / 1000
    assert jpeg_incompressibility(image, ["a"], [{}]).item() == pytest.approx(expected, rel=1e-6)


def test_jpeg_clamps_out_of_range_values():
    image = _images(1)
    out_of_range = image * 3 - 1  # values in [-1, 2]
    clamped = out_of_range.clamp(0, 1)
    a = jpeg_compressibility(out_of_range, ["a"], [{}])
    b = jpeg_compressibility(clamped, ["a"], [{}])
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_output_shape_dtype_device(dtype):
    images, prompts, metadata = _inputs(3)
    reward = build_reward({"jpeg_compressibility": 1.0, "jpeg_incompressibility": 0.5}, "cpu")
    scores = reward(images.to(dtype), prompts, metadata)
    assert set(scores) == {"jpeg_compressibility", "jpeg_incompressibility", "avg"}
    for value in scores.values():
        assert value.shape == (3,)
        assert value.dtype == torch.float32
        assert value.device.type == "cpu"


def test_multi_reward_weighted_sum_keeps_raw_scores(fake_rewards):
    images, prompts, metadata = _inputs(4)
    weights = {"jpeg_compressibility": 0.5, "test_brightness": 2.0, "test_index": -1.0}
    reward = build_reward(weights, torch.device("cpu"))
    assert reward.names == ["jpeg_compressibility", "test_brightness", "test_index"]
    scores = reward(images, prompts, metadata)

    jpeg = jpeg_compressibility(images, prompts, metadata)
    brightness = images.mean(dim=(1, 2, 3))
    index = torch.arange(4, dtype=torch.float32)
    torch.testing.assert_close(scores["jpeg_compressibility"], jpeg)
    torch.testing.assert_close(scores["test_brightness"], brightness)
    torch.testing.assert_close(scores["test_index"], index)
    torch.testing.assert_close(scores["avg"], 0.5 * jpeg + 2.0 * brightness - index)


def test_select_reweights_without_building_again(fake_rewards):
    built = build_reward({"test_brightness": 1.0, "test_index": 1.0}, "cpu")
    assert len(fake_rewards) == 1  # the brightness factory ran once
    train, evaluation = built.select({"test_brightness": 2.0}), built.select({"test_index": 1.0, "test_brightness": 1.0})
    assert len(fake_rewards) == 1  # selecting builds nothing
    images, prompts, metadata = _inputs(3)
    torch.testing.assert_close(train(images, prompts, metadata)["avg"], 2.0 * images.mean(dim=(1, 2, 3)))
    assert evaluation.names == ["test_index", "test_brightness"]
    with pytest.raises(ValueError, match="not built"):
        built.select({"jpeg_compressibility": 1.0})


def test_factory_receives_device_and_its_options(fake_rewards):
    options = {"test_brightness": {"scale": 3.0}, "jpeg_incompressibility": {"unused": 1}}
    reward = build_reward({"test_brightness": 1.0}, "cpu", options)
    assert fake_rewards == [(torch.device("cpu"), {"scale": 3.0})]
    images, prompts, metadata = _inputs(2)
    torch.testing.assert_close(reward(images, prompts, metadata)["avg"], 3.0 * images.mean(dim=(1, 2, 3)))


def test_jpeg_rejects_options():
    with pytest.raises(ValueError, match="takes no options"):
        build_reward({"jpeg_compressibility": 1.0}, "cpu", {"jpeg_compressibility": {"quality": 50}})


def test_unknown_reward_names_list_available():
    with pytest.raises(ValueError) as error:
        build_reward({"jpeg_compressibility": 1.0, "pickscroe": 1.0}, "cpu")
    message = str(error.value)
    assert "pickscroe" in message
    assert "jpeg_compressibility" in message and "jpeg_incompressibility" in message

    with pytest.raises(ValueError, match="typo_reward"):
        build_reward({"jpeg_compressibility": 1.0}, "cpu", {"typo_reward": {}})


def test_check_reward_names_builds_nothing(monkeypatch):
    def exploding_factory(device, options):
        raise AssertionError("check_reward_names must not build rewards")

    monkeypatch.setitem(registry._REGISTRY, "test_heavy_model", exploding_factory)
    check_reward_names(["test_heavy_model", "jpeg_compressibility"])
    with pytest.raises(ValueError, match=r"missing_reward.*available rewards.*jpeg_compressibility"):
        check_reward_names(["jpeg_compressibility", "missing_reward"])


def test_empty_weights_and_bad_weights_error():
    with pytest.raises(ValueError, match="No reward configured"):
        build_reward({}, "cpu")
    with pytest.raises(ValueError, match="finite"):
        build_reward({"jpeg_compressibility": float("nan")}, "cpu")


def test_register_rejects_duplicates_and_reserved_name(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    with pytest.raises(ValueError, match="already registered"):
        register_reward("jpeg_compressibility")(lambda device, options: jpeg_compressibility)
    with pytest.raises(ValueError, match="reserved"):
        register_reward("avg")
    register_reward("test_new_reward")(lambda device, options: jpeg_compressibility)
    assert "test_new_reward" in available_rewards()


def test_multi_reward_checks_inputs_and_outputs(monkeypatch):
    monkeypatch.setitem(
        registry._REGISTRY, "test_wrong_shape", lambda device, options: lambda i, p, m: torch.zeros(len(p), 1)
    )
    images, prompts, metadata = _inputs(3)
    reward = build_reward({"jpeg_compressibility": 1.0}, "cpu")
    with pytest.raises(ValueError, match="one prompt and one metadata"):
        reward(images, prompts[:2], metadata)
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        reward(images[:, :1], prompts, metadata)
    with pytest.raises(ValueError, match="float images"):
        reward((images * 255).to(torch.int32), prompts, metadata)
    bad = build_reward({"test_wrong_shape": 1.0}, "cpu")
    with pytest.raises(ValueError, match="test_wrong_shape"):
        bad(images, prompts, metadata)


def test_async_scorer_matches_direct_call(fake_rewards):
    reward = build_reward({"jpeg_compressibility": 1.0, "test_index": 0.25}, "cpu")
    batches = [_inputs(3), (_images(2, seed=1), ["x", "y"], [{"index": 5}, {"index": 7}])]
    with AsyncScorer(reward, max_workers=2) as scorer:
        futures = [scorer.submit(*batch) for batch in batches]
        results = [future.result(timeout=30) for future in futures]
    for batch, result in zip(batches, results):
        expected = reward(*batch)
        assert result.keys() == expected.keys()
        for key in expected:
            torch.testing.assert_close(result[key], expected[key])


def test_async_scorer_runs_in_background_without_grad():
    seen = {}

    def score(images, prompts, metadata):
        seen["thread"] = threading.current_thread().name
        seen["grad"] = torch.is_grad_enabled()
        seen["requires_grad"] = images.requires_grad
        return torch.zeros(len(prompts))

    reward = MultiReward({"probe": score}, {"probe": 1.0})
    images = _images(2).requires_grad_(True)
    with AsyncScorer(reward) as scorer:
        scorer.submit(images * 2, ["a", "b"], [{}, {}]).result(timeout=30)
    assert seen["thread"] != threading.current_thread().name
    assert seen == {"thread": seen["thread"], "grad": False, "requires_grad": False}


def test_async_scorer_propagates_errors_and_refuses_after_close():
    def failing(images, prompts, metadata):
        raise RuntimeError("reward server down")

    scorer = AsyncScorer(MultiReward({"failing": failing}, {"failing": 1.0}))
    future = scorer.submit(*_inputs(2))
    with pytest.raises(RuntimeError, match="reward server down"):
        future.result(timeout=30)
    scorer.close()
    with pytest.raises(RuntimeError, match="closed"):
        scorer.submit(*_inputs(2))
    with pytest.raises(ValueError, match="max_workers"):
        AsyncScorer(MultiReward({"failing": failing}, {"failing": 1.0}), max_workers=0)
