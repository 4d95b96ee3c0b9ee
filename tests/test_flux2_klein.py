"""FLUX.2-klein specifics: the step-distilled variant takes no CFG whatever the guidance scale."""

from __future__ import annotations

import torch

from flow_grpo.models import adapter_class
from flow_grpo.sampling.rollouts import sample_ode
from flow_grpo.testing import tiny_flux2_klein_pipeline

PROMPTS = ["a red bicycle", "Two cats on a sofa"]


def test_distilled_variant_ignores_guidance_and_matches_its_pipeline() -> None:
    pipeline = tiny_flux2_klein_pipeline("minimal", distilled=True)
    pipeline.set_progress_bar_config(disable=True)
    adapter = adapter_class("flux2_klein")(pipeline, guidance_scale=4.0, max_sequence_length=32)
    assert not adapter.uses_cfg
    base = adapter_class("flux2_klein")(tiny_flux2_klein_pipeline("minimal"), guidance_scale=4.0, max_sequence_length=32)
    assert base.uses_cfg
    noise = adapter.initial_latents(len(PROMPTS), 16, torch.Generator().manual_seed(0))
    expected = pipeline(
        prompt=list(PROMPTS), latents=adapter.pipeline_latents(noise), num_inference_steps=4, guidance_scale=4.0,
        height=16, width=16, max_sequence_length=32, output_type="pt",
    ).images
    images = sample_ode(adapter, adapter.encode_prompts(PROMPTS), num_steps=4, resolution=16, initial_latents=noise)
    torch.testing.assert_close(images, expected, rtol=1e-5, atol=1e-5)
    # The base variant's CFG changes the images: the distilled adapter really skipped it.
    guided = sample_ode(base, base.encode_prompts(PROMPTS), num_steps=4, resolution=16, initial_latents=noise)
    assert (guided - images).abs().max() > 1e-3
