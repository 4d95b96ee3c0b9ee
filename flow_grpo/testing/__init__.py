"""Tiny, randomly initialised models of the real classes for offline tests, the demo and CPU benchmarks.

`pipelines` builds tiny SD3 and FLUX pipelines, `pipelines_qwen` tiny FLUX.2-klein, Z-Image and Qwen-Image ones; `rewards` builds tiny CLIP, open_clip, aesthetic and
detector models for the reward tests, `preference_models` tiny ImageReward and HPSv3 checkpoints in their published
layouts. Nothing here downloads anything.
"""

from flow_grpo.testing.pipelines import (
    BUILDERS,
    CLIP_MAX_LENGTH,
    GEOMETRIES,
    T5_MAX_LENGTH,
    TinyGeometry,
    clip_tokenizer,
    save_tiny_pipeline,
    t5_tokenizer,
    tiny_builder,
    tiny_flux_pipeline,
    tiny_sd3_pipeline,
)
from flow_grpo.testing.pipelines_qwen import (
    qwen_tokenizer,
    tiny_flux2_klein_pipeline,
    tiny_qwen_image_pipeline,
    tiny_z_image_pipeline,
)

__all__ = [
    "BUILDERS",
    "CLIP_MAX_LENGTH",
    "GEOMETRIES",
    "T5_MAX_LENGTH",
    "TinyGeometry",
    "clip_tokenizer",
    "save_tiny_pipeline",
    "t5_tokenizer",
    "tiny_builder",
    "qwen_tokenizer",
    "tiny_flux2_klein_pipeline",
    "tiny_flux_pipeline",
    "tiny_qwen_image_pipeline",
    "tiny_sd3_pipeline",
    "tiny_z_image_pipeline",
]
