"""Memory cuts that change no result: uint8 images for the rewards, the VAE decode chunk, one encoding
of each distinct prompt per epoch, text-encoder offload; and the trainer's start-up memory check."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from flow_grpo.training import memory
from flow_grpo.training.memory import GIB, InsufficientMemoryError, preflight
from flow_grpo.training.epoch import encode_epoch_prompts
from flow_grpo.rewards import build_reward
from flow_grpo.rewards.images import to_uint8
from flow_grpo.rewards.transport import encode_images
from flow_grpo.testing.rewards import save_tiny_aesthetic_head, save_tiny_clip, save_tiny_open_clip
from flow_grpo.training.trainer import Trainer
from tests.test_trainer import ROOT, tiny_config

_spec = importlib.util.spec_from_file_location("presets_for_memory_cuts", ROOT / "config" / "grpo.py")
presets = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(presets)


def _config(model_dir: str, logdir: Path, **changes):
    """One TP-GRPO epoch of the tiny preset on 2 prompts (16 trajectories, 2 sampling batches), decoded in one call."""
    return tiny_config(model_dir, logdir, **{"sample.decode_chunk": 0, **changes})


def _one_epoch(model_dir: str, logdir: Path, **changes) -> tuple[Trainer, dict[str, torch.Tensor], list[torch.Tensor]]:
    """Sample, score and train one epoch; returns the trainer, the rewards and the trained LoRA."""
    trainer = Trainer(_config(model_dir, logdir, **changes))
    samples = trainer.sample_epoch(0)
    advantages, _ = trainer.advantages(0, samples)
    trainer.train_epoch(0, samples, advantages)
    rewards = {**samples.rewards, "completed": samples.completed_rewards}
    return trainer, rewards, [p.detach().clone() for p in trainer.trainable]


@pytest.fixture(scope="module")
def baseline(tiny_sd3_real_dir: str, tmp_path_factory: pytest.TempPathFactory):
    """Rewards and LoRA after one epoch with every option off (one VAE call, encoders stay on the device)."""
    _, rewards, lora = _one_epoch(tiny_sd3_real_dir, tmp_path_factory.mktemp("baseline"))
    return rewards, lora


@pytest.mark.parametrize("changes", [{"sample.decode_chunk": 3}, {"offload_text_encoders": True}], ids=str)
def test_epoch_options_change_no_result(baseline, tiny_sd3_real_dir, tmp_path, changes) -> None:
    rewards, lora = baseline
    trainer, got_rewards, got_lora = _one_epoch(tiny_sd3_real_dir, tmp_path, **changes)
    assert rewards.keys() == got_rewards.keys()
    for name, value in rewards.items():
        assert torch.equal(value, got_rewards[name]), name
    assert all(torch.equal(a, b) for a, b in zip(lora, got_lora))
    if changes.get("offload_text_encoders"):
        adapter = trainer.adapter
        assert adapter.text_encoders_offloaded and len(adapter.text_encoders()) == 3
        adapter.encode_prompts(["a red cube"])  # the next encoding brings them back
        assert not adapter.text_encoders_offloaded


def test_offload_moves_text_encoders_to_cpu_and_back(tiny_sd3_real_dir, tmp_path, monkeypatch) -> None:
    """Each text encoder goes to the CPU after the epoch's encoding and back to the device for the next one."""
    trainer = Trainer(_config(tiny_sd3_real_dir, tmp_path, offload_text_encoders=True))
    adapter = trainer.adapter
    moves: list[str] = []
    for module in adapter.text_encoders():
        monkeypatch.setattr(module, "to", lambda device, module=module: moves.append(str(device)) or module)
    adapter.offload_text_encoders()
    adapter.offload_text_encoders()  # twice: still one move back
    assert moves == ["cpu"] * 6
    adapter.encode_prompts(["a red cube"])
    assert moves[6:] == [str(adapter.device)] * 3


def test_each_distinct_prompt_is_encoded_once(tiny_sd3_real_dir) -> None:
    from flow_grpo.models import SD3Adapter

    adapter = SD3Adapter.from_pretrained(tiny_sd3_real_dir, guidance_scale=4.5, max_sequence_length=64)
    batches = [["a cat", "a dog", "a cat"], ["a dog", "a bird", "a bird"], ["a cat", "a cat", "a cat"]]
    calls: list[list[str]] = []
    encode = adapter.encode_prompts
    adapter.encode_prompts = lambda texts: calls.append(list(texts)) or encode(texts)
    embeds = encode_epoch_prompts(adapter, batches, chunk=2)
    assert calls == [["a cat", "a dog"], ["a bird"]]  # 3 distinct prompts, chunks of 2
    for texts, got in zip(batches, embeds):
        expected = encode(texts)
        assert got.tensors.keys() == expected.tensors.keys()
        for name in expected.tensors:
            # Equal up to the rounding of batched matrix products (another batch composition).
            torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6)
        for i, text in enumerate(texts):  # rows of one prompt are one encoding: bitwise equal
            first = texts.index(text)
            assert all(torch.equal(got[name][i], got[name][first]) for name in got.tensors)


# ---- rewards score uint8 images exactly as the float images they were rounded from ----


@pytest.fixture(scope="module")
def reward_options(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    root = tmp_path_factory.mktemp("tiny-rewards")
    clip = save_tiny_clip(root / "clip")
    arch, checkpoint = save_tiny_open_clip(root / "open_clip")
    return {
        "pickscore": {"model": clip, "processor": clip},
        "clipscore": {"model": clip},
        "aesthetic": {"model": clip, "head": save_tiny_aesthetic_head(root / "head")},
        "hpsv2": {"architecture": arch, "checkpoint": checkpoint},
    }


def _float_images(num: int = 4, side: int = 40) -> torch.Tensor:
    """Float images off the 8-bit grid, a few values outside [0, 1] (decoded samples are clamped, rewards clamp too)."""
    images = torch.rand(num, 3, side, side, generator=torch.Generator().manual_seed(3)) * 1.1 - 0.05
    return images


@pytest.mark.parametrize(
    "name", ["jpeg_compressibility", "jpeg_incompressibility", "pickscore", "clipscore", "aesthetic", "hpsv2"]
)
def test_rewards_score_uint8_images_exactly_as_float(reward_options, name) -> None:
    images = _float_images()
    prompts, metadata = ["a cat", "a dog", "a cat", "a bird"], [{}] * 4
    reward = build_reward({name: 1.0}, "cpu", {k: v for k, v in reward_options.items() if k == name})
    from_float = reward(images, prompts, metadata)
    from_uint8 = reward(to_uint8(images), prompts, metadata)
    assert torch.equal(from_float[name], from_uint8[name])
    assert not torch.equal(from_float[name], reward(images.flip(0), prompts, metadata)[name])  # the scores see the pixels


@pytest.mark.parametrize("image_format", ["raw", "png"])
def test_remote_reward_sends_the_same_bytes_for_uint8(image_format) -> None:
    images = _float_images(2)
    assert encode_images(images, image_format) == encode_images(to_uint8(images), image_format)


def test_decode_chunk_and_offload_in_the_preflight(tiny_sd3_dir) -> None:
    config = presets.tiny_tp_grpo()
    config.pretrained.model = tiny_sd3_dir
    one_call = memory.predict_memory(config, 1)
    config.sample.decode_chunk = 1
    config.offload_text_encoders = True
    chunked = memory.predict_memory(config, 1)
    assert chunked.settings["decode_states"] == 1 and one_call.settings["decode_states"] == 9
    assert chunked.components["decode_call_live"] < one_call.components["decode_call_live"] / 4
    text = sum(v for k, v in chunked.components.items() if k.startswith("text:"))
    assert text > 0
    assert chunked.phase("encoding").weights - chunked.phase("update").weights == text
    assert one_call.phase("encoding").weights == one_call.phase("update").weights


# ---- the trainer's start-up check ----


def test_trainer_stops_before_loading_the_model_when_cuda_memory_is_short(tiny_sd3_real_dir, tmp_path, monkeypatch) -> None:
    """On a (pretended) 1 GB CUDA device the trainer stops with advice before any weights load."""
    import flow_grpo.training.trainer as trainer_module

    real_state = trainer_module.PartialState

    class PretendCuda:
        """The process state with a CUDA device."""

        device = torch.device("cuda", 0)

        def __init__(self, *args, **kwargs) -> None:
            self._state = real_state(*args, **kwargs)

        def __getattr__(self, name: str):
            return getattr(self._state, name)

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(trainer_module, "PartialState", PretendCuda)
    monkeypatch.setattr(trainer_module, "load_adapter", no_loading)
    monkeypatch.setattr(memory.torch.cuda, "get_device_properties", lambda device: SimpleNamespace(total_memory=GIB // 64))
    with pytest.raises(InsufficientMemoryError, match="predicted peak per process .* Change:"):
        Trainer(_config(tiny_sd3_real_dir, tmp_path))
    assert not (tmp_path / "test").exists()  # stopped before the run directory was written
    with pytest.raises(AssertionError, match="the model was loaded"):  # memory_check=False skips the check
        Trainer(_config(tiny_sd3_real_dir, tmp_path, memory_check=False))


def test_preflight_runs_only_on_cuda(tiny_sd3_dir) -> None:
    config = presets.tiny_tp_grpo()
    config.pretrained.model = tiny_sd3_dir
    assert preflight(config, 1, torch.device("cpu")) is None
