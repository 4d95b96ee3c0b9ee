"""Adapter conformance: every registered model family must pass this suite on its tiny pipeline.

Parity with the family's diffusers pipeline at noise level 0, log-probs that recompute from the
recorded states, lockstep completions equal to completing each branch alone (one transformer call
per grid step), LoRA targets that exist in the transformer, and encode / velocity / decode shapes.
A new family is covered by registering its adapter and its tiny builder; family specifics (FLUX's
packed layout, SD3's CFG rows) stay in tests/test_flux.py and tests/test_sampling.py.
"""

from __future__ import annotations

from pathlib import Path

import ml_collections
import pytest
import torch
from peft import LoraConfig
from peft.tuners.lora import LoraLayer

from flow_grpo.models import ADAPTERS, ModelAdapter, adapter_class, call_rows, load_adapter, register_adapter
from flow_grpo.sampling.rollouts import rollout, sample_ode
from flow_grpo.algorithm.sde import euler_step, stochastic_step
from flow_grpo.testing import BUILDERS
from flow_grpo.training.compile import CompiledPhases
from flow_grpo.training.step import adapters_disabled, add_lora

PROMPTS = ["a red bicycle", "Two cats on a sofa", "a lighthouse at dusk"]
RESOLUTION = {"minimal": 16, "real": 64}
MAX_SEQUENCE_LENGTH = 32
FAMILIES = sorted(ADAPTERS)

_SAVED: dict[tuple[str, str], str] = {}


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory: pytest.TempPathFactory):
    """`pipeline_dir(family, geometry)`: the family's tiny pipeline saved once per session."""

    def saved(family: str, geometry: str) -> str:
        key = (family, geometry)
        if key not in _SAVED:
            path = tmp_path_factory.mktemp(f"tiny-{family}-{geometry}")
            BUILDERS[family](geometry).save_pretrained(str(path))
            _SAVED[key] = str(path)
        return _SAVED[key]

    return saved


def make_adapter(family: str, path: str, guidance: float = 4.5) -> ModelAdapter:
    return adapter_class(family).from_pretrained(path, guidance_scale=guidance, max_sequence_length=MAX_SEQUENCE_LENGTH)


@pytest.fixture(scope="module", params=FAMILIES)
def family(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def adapter(family: str, pipeline_dir) -> ModelAdapter:
    return make_adapter(family, pipeline_dir(family, "minimal"))


class CallCounter:
    """Records the batch size of every transformer forward (a pre-hook, so the model is unchanged)."""

    def __init__(self, transformer: torch.nn.Module) -> None:
        self.batches: list[int] = []
        self.handle = transformer.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module, args, kwargs) -> None:
        # A batched tensor (B, ...) or, for transformers that take one tensor per sample (Z-Image), a list.
        self.batches.append(call_rows(args, kwargs))

    def remove(self) -> None:
        self.handle.remove()


def test_every_family_has_a_tiny_builder_and_knows_its_name() -> None:
    assert FAMILIES, "no adapter registered"
    assert sorted(BUILDERS) == FAMILIES
    for name in FAMILIES:
        assert adapter_class(name).family == name


def test_registry_rejects_unknown_and_conflicting_families() -> None:
    with pytest.raises(ValueError, match=r"unknown model family 'sdxl'.*config.pretrained.family"):
        adapter_class("sdxl")
    with pytest.raises(ValueError, match="already registered"):

        @register_adapter(FAMILIES[0])
        class Impostor(adapter_class(FAMILIES[0])):  # noqa: F841
            pass

    with pytest.raises(TypeError, match="ModelAdapter"):
        register_adapter("not_an_adapter")(dict)
    assert "not_an_adapter" not in ADAPTERS


class TestAdapterConformance:
    """Run for every registered family (the `family` fixture)."""

    @pytest.mark.parametrize("geometry", ["minimal", "real"])
    # 1.0 and 0.0 switch CFG off (SD3, FLUX.2-klein: CFG for w > 1; Z-Image: for w > 0).
    @pytest.mark.parametrize("guidance", [4.5, 1.0, 0.0])
    def test_noise_zero_matches_diffusers_pipeline(self, family, pipeline_dir, geometry, guidance) -> None:
        path = pipeline_dir(family, geometry)
        resolution = RESOLUTION[geometry]
        adapter = make_adapter(family, path, guidance)
        noise = adapter.initial_latents(len(PROMPTS), resolution, torch.Generator().manual_seed(3))
        pipeline = adapter.pipeline_class.from_pretrained(path)
        pipeline.set_progress_bar_config(disable=True)
        expected = pipeline(
            prompt=list(PROMPTS),  # a copy: ZImagePipeline writes its chat-templated prompts into the list

            latents=adapter.pipeline_latents(noise.clone()),
            num_inference_steps=5,
            **adapter.pipeline_guidance(guidance),
            height=resolution,
            width=resolution,
            max_sequence_length=MAX_SEQUENCE_LENGTH,
            output_type="pt",
        ).images
        # The (resolution-dependent) sigma grid is the one the pipeline just used.
        torch.testing.assert_close(adapter.sigmas(5, resolution), pipeline.scheduler.sigmas.float(), rtol=0, atol=1e-6)
        embeds = adapter.encode_prompts(PROMPTS)
        for kind in ("sde", "cps"):
            # Noise level 0 inside a window: the stochastic steps must reduce to the pipeline's Euler steps.
            result = rollout(
                adapter, embeds, num_steps=5, resolution=resolution, window_start=1, window_size=3,
                noise_level=0.0, step_kind=kind, initial_latents=noise,
            )
            assert result.latents.shape == (len(PROMPTS), 3, *noise.shape[1:])
            torch.testing.assert_close(result.images, expected, rtol=1e-5, atol=1e-5)
        ode = sample_ode(adapter, embeds, num_steps=5, resolution=resolution, initial_latents=noise)
        torch.testing.assert_close(ode, expected, rtol=1e-5, atol=1e-5)

    @pytest.mark.parametrize("kind", ["sde", "cps"])
    def test_log_probs_recompute_from_recorded_states(self, adapter, kind) -> None:
        embeds = adapter.encode_prompts(PROMPTS)
        result = rollout(
            adapter, embeds, num_steps=6, resolution=16, window_start=1, window_size=3,
            noise_level=0.7, step_kind=kind, generator=torch.Generator().manual_seed(0),
        )
        latent_shape = adapter.initial_latents(1, 16, torch.Generator().manual_seed(0)).shape[1:]
        assert result.latents.shape == (3, 3, *latent_shape) and result.log_probs.shape == (3, 3)
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

    @pytest.mark.parametrize("window_start,window_size", [(0, 4), (1, 3), (2, 1)])
    def test_lockstep_completions_equal_sequential_branches(self, adapter, window_start, window_size) -> None:
        num_steps, batch = 6, 3
        embeds = adapter.encode_prompts(PROMPTS)
        noise = adapter.initial_latents(batch, 16, torch.Generator().manual_seed(5))
        counter = CallCounter(adapter.transformer)
        try:
            result = rollout(
                adapter, embeds, num_steps=num_steps, resolution=16, window_start=window_start, window_size=window_size,
                noise_level=0.7, step_kind="cps", branches=True, generator=torch.Generator().manual_seed(6),
                initial_latents=noise,
            )
        finally:
            counter.remove()
        # One transformer call per grid step, one row per live state (CFG doubles the rows, not the calls).
        rows_per_state = 2 if adapter.uses_cfg else 1
        assert counter.batches == [
            rows_per_state * batch * (1 + max(0, min(k - window_start, window_size))) for k in range(num_steps)
        ]
        completed = result.completed_images
        assert completed.shape == (batch, window_size + 1, 3, 16, 16)
        assert torch.equal(completed[:, -1], result.images)  # R_W is the main image

        sigmas = adapter.sigmas(num_steps, 16)

        def complete(state: torch.Tensor, start: int) -> torch.Tensor:
            for k in range(start, num_steps):
                state = euler_step(adapter.velocity(state, sigmas[k].expand(batch), embeds), state, sigmas[k], sigmas[k + 1])
            return adapter.decode(state)

        # R_0: pure ODE from the trajectory's own initial noise.
        torch.testing.assert_close(completed[:, 0], complete(noise, 0), rtol=1e-5, atol=1e-5)
        # R_j: j SDE steps of the window, then ODE to the end, from the recorded states.
        for j in range(1, window_size):
            torch.testing.assert_close(completed[:, j], complete(result.latents[:, j], window_start + j), rtol=1e-5, atol=1e-5)

    def test_regional_compile_matches_eager_in_every_phase(self, family, pipeline_dir) -> None:
        # A fresh adapter: compiling routes its blocks' calls through dynamo for good.
        adapter = make_adapter(family, pipeline_dir(family, "minimal"))
        lora = add_lora(adapter.transformer, 4, 8, adapter.lora_target_modules, seed=0)
        with torch.no_grad():  # B = 0 at initialisation: give the LoRA an effect to compare
            for param in lora[1::2]:
                param.normal_(0.0, 0.02, generator=torch.Generator().manual_seed(1))
        embeds = adapter.encode_prompts(PROMPTS[:2])
        latents = adapter.initial_latents(2, 16, torch.Generator().manual_seed(0))
        sigmas = torch.tensor([0.8, 0.5])

        def phases(rollout_forward, policy_forward, reference_forward) -> list[torch.Tensor]:
            with torch.no_grad():
                rolled = adapter.velocity(latents, sigmas, embeds, transformer=rollout_forward)
                with adapters_disabled(adapter.transformer):
                    reference = adapter.velocity(latents, sigmas, embeds, transformer=reference_forward)
            for param in lora:
                param.grad = None
            policy = adapter.velocity(latents, sigmas, embeds, transformer=policy_forward)
            policy.square().mean().backward()
            # A LoRA whose output nothing reads (e.g. the last block's text stream) has no gradient.
            grads = [torch.zeros_like(param) if param.grad is None else param.grad.clone() for param in lora]
            return [rolled, reference, policy.detach(), *grads]

        adapter.transformer.eval()
        eager = phases(*[adapter.transformer] * 3)
        rows_per_state = 2 if adapter.uses_cfg else 1
        # The training phases pad the 2 states of this call to a micro-batch of 3.
        compiled = CompiledPhases(adapter.transformer, adapter.transformer, 3 * rows_per_state,
                                  {"rollout": 1, "policy": 1, "reference": 1}, backend="eager")
        traced = phases(compiled.rollout, compiled.policy, compiled.reference)
        for got, expected in zip(traced, eager, strict=True):
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
        # One graph per block kind and phase: the lists of a model (Z-Image's refiners) are kinds of their own.
        assert all(graphs == {"rollout": 1, "reference": 1, "policy": 1} for graphs in compiled.graphs_by_kind().values())

    def test_lora_targets_exist_in_the_transformer(self, family) -> None:
        transformer = BUILDERS[family]("minimal").transformer
        linears = [name for name, module in transformer.named_modules() if isinstance(module, torch.nn.Linear)]
        targets = adapter_class(family).lora_target_modules
        for pattern in targets:
            assert any(name == pattern or name.endswith("." + pattern) for name in linears), pattern
        transformer.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=targets))
        adapted = [name for name, module in transformer.named_modules() if isinstance(module, LoraLayer)]
        assert adapted and all(any(name.endswith(pattern) for pattern in targets) for name in adapted)

    def test_loads_by_family_with_frozen_components_and_documented_shapes(self, family, pipeline_dir) -> None:
        config = ml_collections.ConfigDict(
            {
                "pretrained": {"family": family, "model": pipeline_dir(family, "minimal"), "revision": "",
                               "max_sequence_length": MAX_SEQUENCE_LENGTH},
                "sample": {"guidance_scale": 4.5},
            }
        )
        adapter = load_adapter(config, "cpu", torch.bfloat16)
        assert type(adapter) is adapter_class(family) and isinstance(adapter.pipeline, adapter.pipeline_class)
        assert adapter.dtype == torch.bfloat16 and adapter.transformer.dtype == torch.bfloat16
        for component in adapter.pipeline.components.values():
            if isinstance(component, torch.nn.Module):
                assert not component.training and not any(p.requires_grad for p in component.parameters())
        embeds = adapter.encode_prompts(PROMPTS[:2])
        assert len(embeds) == 2 and all(value.shape[0] == 2 for value in embeds.tensors.values())
        assert len(embeds.select(torch.tensor([1]))) == 1
        latents = adapter.initial_latents(2, 16, torch.Generator().manual_seed(0))
        assert latents.dtype == torch.float32 and latents.shape[0] == 2
        velocity = adapter.velocity(latents, torch.full((2,), 0.5), embeds)
        assert velocity.dtype == torch.float32 and velocity.shape == latents.shape
        images = adapter.decode(latents)
        assert images.shape == (2, 3, 16, 16) and images.dtype == torch.float32
        assert 0.0 <= float(images.min()) and float(images.max()) <= 1.0
        assert 16 % adapter.resolution_multiple(str(Path(config.pretrained.model))) == 0
