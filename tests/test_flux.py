"""FLUX adapter: parity with FluxPipeline, log-prob consistency, lockstep exactness, loading, LoRA targets."""

from __future__ import annotations

import ml_collections
import pytest
import torch
from diffusers import FluxPipeline
from peft import LoraConfig
from peft.tuners.lora import LoraLayer

from flow_grpo.models import ADAPTERS, FluxAdapter, load_adapter
from flow_grpo.sampling import rollout, sample_ode
from flow_grpo.sde import euler_step, stochastic_step

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


@pytest.mark.parametrize("geometry", ["minimal", "real"])
def test_ode_rollout_matches_diffusers_pipeline(geometry, tiny_flux_dir, tiny_flux_real_dir) -> None:
    path = tiny_flux_dir if geometry == "minimal" else tiny_flux_real_dir
    resolution = RESOLUTION[geometry]
    adapter = _adapter(path)
    noise = adapter.initial_latents(len(PROMPTS), resolution, torch.Generator().manual_seed(3))
    assert noise.shape == (len(PROMPTS), *PACKED[geometry]) and noise.dtype == torch.float32
    pipeline = FluxPipeline.from_pretrained(path)
    pipeline.set_progress_bar_config(disable=True)
    expected = pipeline(
        prompt=PROMPTS,
        latents=noise.clone(),
        num_inference_steps=5,
        guidance_scale=GUIDANCE,
        height=resolution,
        width=resolution,
        max_sequence_length=32,
        output_type="pt",
    ).images
    # The resolution-dependent shifted grid is the one the pipeline just used.
    torch.testing.assert_close(adapter.sigmas(5, resolution), pipeline.scheduler.sigmas.float(), rtol=0, atol=1e-7)
    embeds = adapter.encode_prompts(PROMPTS)
    for kind in ("sde", "cps"):
        # Noise level 0 inside a window: the stochastic steps must reduce to the pipeline's Euler steps.
        result = rollout(
            adapter, embeds, num_steps=5, resolution=resolution, window_start=1, window_size=3,
            noise_level=0.0, step_kind=kind, initial_latents=noise,
        )
        assert result.latents.shape == (len(PROMPTS), 3, *PACKED[geometry])
        torch.testing.assert_close(result.images, expected, rtol=1e-5, atol=1e-5)
    ode = sample_ode(adapter, embeds, num_steps=5, resolution=resolution, initial_latents=noise)
    torch.testing.assert_close(ode, expected, rtol=1e-5, atol=1e-5)


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


@pytest.mark.parametrize("kind", ["sde", "cps"])
def test_rollout_log_probs_recompute(adapter, kind) -> None:
    embeds = adapter.encode_prompts(PROMPTS)
    result = rollout(
        adapter, embeds, num_steps=6, resolution=16, window_start=1, window_size=3,
        noise_level=0.7, step_kind=kind, generator=torch.Generator().manual_seed(0),
    )
    assert result.latents.shape == (3, 3, *PACKED["minimal"]) and result.log_probs.shape == (3, 3)
    assert result.timesteps.tolist() == [[1, 2, 3]] * 3
    sigmas = adapter.sigmas(6, 16)
    for j in range(3):
        torch.testing.assert_close(result.sigmas[:, j], sigmas[1 + j].expand(3))
        velocity = adapter.velocity(result.latents[:, j], result.sigmas[:, j], embeds)
        step = stochastic_step(
            kind, velocity, result.latents[:, j], result.sigmas[:, j], result.next_sigmas[:, j], 0.7,
            sigma_max=float(sigmas[1]), next_latents=result.next_latents[:, j],
        )
        torch.testing.assert_close(step.log_prob, result.log_probs[:, j], rtol=1e-5, atol=1e-6)
        if j:
            torch.testing.assert_close(result.latents[:, j], result.next_latents[:, j - 1])


class _CountingTransformer(torch.nn.Module):
    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.batches: list[int] = []

    def forward(self, **kwargs):
        self.batches.append(kwargs["hidden_states"].shape[0])
        return self.inner(**kwargs)


@pytest.mark.parametrize("window_start,window_size", [(0, 4), (1, 3)])
def test_lockstep_completions_equal_separate_branches(adapter, window_start, window_size) -> None:
    num_steps, batch = 6, 3
    embeds = adapter.encode_prompts(PROMPTS)
    noise = adapter.initial_latents(batch, 16, torch.Generator().manual_seed(5))
    counter = _CountingTransformer(adapter.transformer)
    result = rollout(
        adapter, embeds, num_steps=num_steps, resolution=16, window_start=window_start, window_size=window_size,
        noise_level=0.7, step_kind="cps", branches=True, generator=torch.Generator().manual_seed(6),
        initial_latents=noise, transformer=counter,
    )
    # One transformer call per grid step, one row per live state (no CFG).
    assert len(counter.batches) == num_steps
    assert counter.batches == [batch * (1 + max(0, min(k - window_start, window_size))) for k in range(num_steps)]
    completed = result.completed_images
    assert completed.shape == (batch, window_size + 1, 3, 16, 16)
    assert torch.equal(completed[:, -1], result.images)  # R_W is the main image

    sigmas = adapter.sigmas(num_steps, 16)

    def complete(state: torch.Tensor, start: int) -> torch.Tensor:
        for k in range(start, num_steps):
            velocity = adapter.velocity(state, sigmas[k].expand(batch), embeds)
            state = euler_step(velocity, state, sigmas[k], sigmas[k + 1])
        return adapter.decode(state)

    # R_0: pure ODE from the trajectory's own initial noise.
    torch.testing.assert_close(completed[:, 0], complete(noise, 0), rtol=1e-5, atol=1e-5)
    # R_j: j SDE steps of the window, then ODE to the end, from the recorded states.
    for j in range(1, window_size):
        torch.testing.assert_close(
            completed[:, j], complete(result.latents[:, j], window_start + j), rtol=1e-5, atol=1e-5
        )


def test_loads_through_saved_directory(tiny_flux_dir) -> None:
    assert ADAPTERS["flux"] is FluxAdapter
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
