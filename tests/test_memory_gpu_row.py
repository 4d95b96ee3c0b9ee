"""The preflight against the first GPU measurement, and its VAE decode transient against a trace of the decoder."""

from __future__ import annotations

import math

import torch
from diffusers import AutoencoderKL
from torch.utils._python_dispatch import TorchDispatchMode

from flow_grpo.bench.gpu_check import benchmark_memory_config
from flow_grpo.bench.settings import default_settings
from flow_grpo.testing.architectures import SD3_VAE
from flow_grpo.training import tracing
from flow_grpo.training.autocast_policy import cuda_autocast
from flow_grpo.training.memory import GIB, TRANSIENT_ALLOWANCE, predict_memory

# benchmarks/RESULTS.md: one H200, commit 65414c3, scripts/benchmark.py --size sd3 --dtype bf16 --repeats 2,
# the TP-GRPO rollout decoding all 90 images in one call, torch.cuda.max_memory_allocated.
MEASURED_GIB = {"sampling": 68.9, "update": 48.7}
TOLERANCE = 0.15


class _NormDtypes(TorchDispatchMode):
    """The output dtypes of the group norms run inside the block."""

    def __init__(self) -> None:
        super().__init__()
        self.dtypes: set[torch.dtype] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket is torch.ops.aten.native_group_norm:
            self.dtypes.add(out[0].dtype)
        return out


def test_decode_transient_is_the_traced_decoder() -> None:
    chunk = 2
    config = benchmark_memory_config(default_settings("sd3", decode_chunk=chunk))
    report = predict_memory(config, 1)
    assert report.settings["decode_states"] == chunk
    # The SD3 VAE decoder alone, traced under fake tensors with CUDA's autocast dtypes (float32 group norms).
    with tracing.fake_mode():
        with tracing.default_dtype(torch.float32):
            # Frozen, as in training: autocast keeps the half-precision copy of every weight that
            # requires a gradient for the whole region (0.09 GiB for this decoder).
            vae = AutoencoderKL.from_config(dict(SD3_VAE)).requires_grad_(False)
        latents = torch.empty(chunk, 16, 64, 64)
        norms = _NormDtypes()
        with torch.no_grad(), cuda_autocast(torch.float16), tracing.LiveBytes([*vae.parameters(), *vae.buffers(), latents]) as live:
            with norms:
                vae.decode(latents, return_dict=False)
    assert norms.dtypes == {torch.float32}
    predicted = report.components["decode_call_live"]
    # The preflight's decode adds only the scaled latents and the post-processed images (0.5 MB at 2 images).
    assert abs(predicted - live.peak) < 0.01 * live.peak, (predicted / GIB, live.peak / GIB)
    assert live.peak / chunk > 0.6 * GIB  # 512²: float32 group norms at full resolution, 0.62-0.67 GiB per image
    doubled = predict_memory(benchmark_memory_config(default_settings("sd3", decode_chunk=2 * chunk)), 1)
    assert abs(doubled.components["decode_call_live"] - 2 * predicted) < 0.01 * predicted


def test_unbounded_benchmark_configuration_matches_the_gpu_row() -> None:
    report = predict_memory(benchmark_memory_config(default_settings("sd3", decode_chunk=0)), 1)
    components = report.components
    assert components["decode_call_live"] > components["rollout_call_live"]  # the 90-image decode is the peak
    sampling = report.phase("sampling")
    assert sampling.activations == math.ceil((1 + TRANSIENT_ALLOWANCE) * components["decode_call_live"]) + components[
        "scoring_call_live"
    ]
    for phase, measured in MEASURED_GIB.items():
        predicted = report.phase(phase).total / GIB
        assert abs(predicted - measured) <= TOLERANCE * measured, (phase, predicted, measured)
    chunked = predict_memory(benchmark_memory_config(default_settings("sd3")), 1)  # decode_chunk 9, as training
    assert chunked.phase("sampling").total <= chunked.phase("update").total
