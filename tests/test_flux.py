"""FLUX specifics: packed latents, resolution-shifted sigmas, embedded guidance, bf16 loading, the LoRA target set.

Parity with FluxPipeline, log-prob recomputation, lockstep exactness and the generic shape checks are
the adapter conformance suite (tests/test_adapters.py), which runs every registered family.
"""

from __future__ import annotations

import ml_collections
import pytest
import torch
from diffusers import FluxPipeline
from peft import LoraConfig
from peft.tuners.lora import LoraLayer

from flow_grpo.models import FluxAdapter, load_adapter

PROMPTS = ["a red bicycle", "Two cats on a sofa", "a lighthouse at dusk"]
GUIDANCE = 3.5
RESOLUTION = {"minimal": 16, "real": 64}
# Packed latent shape (tokens, 4 * latent channels) at RESOLUTION.
PACKED = {"minimal": (64, 16), "real": (16, 64)}


@pytest.fixture(scope="session")
def tiny_flux_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny FLUX pipeline (minimal geometry) saved to disk, loaded by tests through from_pretrained."""
    from flow_grpo.testing import save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny-flux"), "flux", "minimal")


@pytest.fixture(scope="session")
def tiny_flux_real_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny FLUX pipeline with the real latent geometry (16 channels, VAE factor 8, packed 64 channels)."""
    from flow_grpo.testing import save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny-flux-real"), "flux", "real")


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """One intra-op thread: on shared CPU cores, tiny ops otherwise spend most of their time in thread sync."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _adapter(path: str, guidance: float = GUIDANCE, **kwargs) -> FluxAdapter:
    return FluxAdapter.from_pretrained(path, guidance_scale=guidance, max_sequence_length=32, **kwargs)


@pytest.fixture(scope="module")
def adapter(tiny_flux_dir: str) -> FluxAdapter:
    return _adapter(tiny_flux_dir)


def test_sigmas_depend_on_resolution(adapter) -> None:
    small, large = adapter.sigmas(6, 16), adapter.sigmas(6, 32)
    assert small.shape == (7,) and small.dtype == torch.float32
    assert small[0] == 1.0 and small[-1] == 0.0 and bool((small[1:] < small[:-1]).all())
    # More image tokens -> larger shift -> more time at high noise.
    assert bool((large[1:-1] > small[1:-1]).all())


def test_guidance_enters_the_embedding(adapter) -> None:
    embeds = adapter.encode_prompts(PROMPTS[:2])
    assert set(embeds.tensors) == {"prompt_embeds", "pooled", "text_ids"}
    assert embeds["text_ids"].shape == (2, 32, 3)
    latents = adapter.initial_latents(2, 16, torch.Generator().manual_seed(0))
    sigmas = torch.full((2,), 0.6)
    other = FluxAdapter(adapter.pipeline, guidance_scale=1.0, max_sequence_length=32)
    assert adapter.guidance(2, latents.device).tolist() == [GUIDANCE, GUIDANCE]
    assert not torch.allclose(adapter.velocity(latents, sigmas, embeds), other.velocity(latents, sigmas, embeds))
    assert not adapter.uses_cfg


@pytest.mark.parametrize("geometry", ["minimal", "real"])
def test_latents_are_packed(geometry, tiny_flux_dir, tiny_flux_real_dir) -> None:
    adapter = _adapter(tiny_flux_dir if geometry == "minimal" else tiny_flux_real_dir)
    noise = adapter.initial_latents(len(PROMPTS), RESOLUTION[geometry], torch.Generator().manual_seed(3))
    assert noise.shape == (len(PROMPTS), *PACKED[geometry]) and noise.dtype == torch.float32
    assert adapter.decode(noise).shape == (len(PROMPTS), 3, RESOLUTION[geometry], RESOLUTION[geometry])


def test_loads_through_saved_directory(tiny_flux_dir) -> None:
    config = ml_collections.ConfigDict(
        {
            "pretrained": {"family": "flux", "model": tiny_flux_dir, "revision": "", "max_sequence_length": 32},
            "sample": {"guidance_scale": GUIDANCE},
        }
    )
    adapter = load_adapter(config, "cpu", torch.bfloat16)
    assert isinstance(adapter, FluxAdapter) and isinstance(adapter.pipeline, FluxPipeline)
    assert adapter.guidance_scale == GUIDANCE and adapter.max_sequence_length == 32
    assert adapter.dtype == torch.bfloat16 and adapter.pipeline.vae.dtype == torch.float32
    assert adapter.pipeline.text_encoder_2.dtype == torch.bfloat16
    for component in adapter.pipeline.components.values():
        if isinstance(component, torch.nn.Module):
            assert not component.training and not any(p.requires_grad for p in component.parameters())
    embeds = adapter.encode_prompts(PROMPTS[:2])
    assert embeds["prompt_embeds"].dtype == torch.bfloat16
    latents = adapter.initial_latents(2, 16, torch.Generator().manual_seed(0))
    velocity = adapter.velocity(latents, torch.full((2,), 0.5), embeds)
    assert velocity.dtype == torch.float32 and velocity.shape == latents.shape
    images = adapter.decode(latents)
    assert images.shape == (2, 3, 16, 16) and images.dtype == torch.float32
    assert 0.0 <= float(images.min()) and float(images.max()) <= 1.0


def test_lora_targets_cover_attention_and_feed_forward() -> None:
    from flow_grpo.testing import tiny_flux_pipeline

    transformer = tiny_flux_pipeline("minimal").transformer
    linears = [name for name, module in transformer.named_modules() if isinstance(module, torch.nn.Linear)]
    for pattern in FluxAdapter.lora_target_modules:
        assert any(name == pattern or name.endswith("." + pattern) for name in linears), pattern
    # Attention of both block kinds and the double-stream feed-forward networks; not the AdaLN
    # modulation ("norm*.linear"), the single-stream MLP (proj_mlp / proj_out) or the output layer.
    expected = {
        name
        for name in linears
        if name.startswith(("transformer_blocks.", "single_transformer_blocks."))
        and ".norm" not in name
        and not name.endswith(("proj_mlp", "proj_out"))
    }
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=FluxAdapter.lora_target_modules))
    adapted = {name for name, module in transformer.named_modules() if isinstance(module, LoraLayer)}
    assert adapted == expected
    assert any(name.startswith("single_transformer_blocks.") and name.endswith("attn.to_q") for name in adapted)
    assert any(name.endswith("ff_context.net.2") for name in adapted)
