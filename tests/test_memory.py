"""Memory preflight: exact resident bytes, fake-tensor traces against real runs, published presets fit 80 GB."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig

from flow_grpo.commands import memory as memory_command
from flow_grpo.training import memory, tracing
from flow_grpo.training.memory import GIB, InsufficientMemoryError, check_fits, load_preset, predict_memory
from flow_grpo.models import SD3Adapter
from flow_grpo.training.step import loss_settings

# Fake-tensor traces vs the same calls on real tensors of the tiny model: saved bytes agree to 1 %,
# live-storage peaks to 5 % (real runs free a few small temporaries at other moments).
SAVED_TOLERANCE = 0.01
LIVE_TOLERANCE = 0.05
DEVICE_80GB = 80 * GIB
PUBLISHED = [
    "pickscore_sd3", "geneval_sd3", "ocr_sd3", "ocr_sd3_basic",
    "pickscore_sd3_flow_grpo", "geneval_sd3_flow_grpo", "ocr_sd3_flow_grpo",
    "pickscore_flux", "geneval_flux", "ocr_flux",
    "pickscore_flux_flow_grpo", "geneval_flux_flow_grpo", "ocr_flux_flow_grpo",
    "pickscore_sd3_large", "pickscore_sd3_large_flow_grpo",
    "pickscore_flux2_klein", "pickscore_flux2_klein_flow_grpo",
    "pickscore_z_image", "pickscore_z_image_flow_grpo",
    "pickscore_qwen_image", "pickscore_qwen_image_flow_grpo",
]


@pytest.fixture(scope="module")
def tiny(tiny_sd3_dir: str):
    """The tiny TP-GRPO preset on the tiny SD3 pipeline, its prediction, and the real model with the trainer's LoRA."""
    config = load_preset("tiny_tp_grpo")
    config.pretrained.model = tiny_sd3_dir
    report = predict_memory(config, 1)
    adapter = SD3Adapter.from_pretrained(
        tiny_sd3_dir, guidance_scale=config.sample.guidance_scale, max_sequence_length=config.pretrained.max_sequence_length
    )
    transformer = adapter.transformer
    transformer.add_adapter(
        LoraConfig(r=config.train.lora_rank, lora_alpha=config.train.lora_alpha, init_lora_weights="gaussian",
                   target_modules=adapter.lora_target_modules)
    )
    trainable = [p for p in transformer.parameters() if p.requires_grad]
    for param in trainable:
        param.data = param.data.float()
    return config, report, adapter, trainable


def test_resident_bytes_are_exact(tiny) -> None:
    config, report, adapter, trainable = tiny
    components = report.components
    lora_ids = {id(p) for p in trainable}
    frozen = [t for t in (*adapter.transformer.parameters(), *adapter.transformer.buffers()) if id(t) not in lora_ids]
    assert components["transformer"] == sum(t.nbytes for t in frozen)
    assert components["vae"] == sum(t.nbytes for t in (*adapter.pipeline.vae.parameters(), *adapter.pipeline.vae.buffers()))
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        module = getattr(adapter.pipeline, name)
        assert components[f"text:{name}"] == sum(t.nbytes for t in {id(t): t for t in (*module.parameters(), *module.buffers())}.values())
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    sum(p.sum() for p in trainable).backward()
    optimizer.step()
    assert components["lora"] == sum(p.nbytes for p in trainable)
    assert components["grads"] == sum(p.grad.nbytes for p in trainable)
    states = [s for p in trainable for s in (optimizer.state[p]["exp_avg"], optimizer.state[p]["exp_avg_sq"])]
    assert components["adamw"] == sum(s.nbytes for s in states)
    assert components["ema"] == 0 and components["ddp_buckets"] == 0  # tiny preset: no EMA, one process
    optimizer.zero_grad(set_to_none=True)


def _relative(predicted: int, measured: int) -> float:
    return abs(predicted - measured) / measured


def test_traces_match_real_runs(tiny) -> None:
    """Fake-tensor traces of the update, rollout call and decode agree with the same calls on real tensors."""
    config, report, adapter, trainable = tiny
    sample, train = config.sample, config.train
    generator = torch.Generator().manual_seed(0)
    rows = train.batch_size
    adapter.negative_prompt()
    batch = memory.update_trace_batch(adapter, rows, sample.resolution, None)
    batch.next_latents.normal_(generator=generator)
    advantages = torch.randn(rows, generator=generator)
    model_tensors = tracing.module_tensors(adapter.transformer, adapter.pipeline.vae)
    saved = tracing.SavedBytes(model_tensors)
    existing = [*model_tensors, batch.latents, batch.next_latents, batch.sigmas, batch.next_sigmas, batch.log_probs,
                advantages, *batch.prompts.tensors.values(), *adapter.negative_prompt().tensors.values()]
    with tracing.LiveBytes(existing) as live:
        memory.traced_update(adapter, batch, advantages, loss_settings(config, sigma_max=0.99), torch.float32, saved)
    for param in trainable:
        param.grad = None
    measured = report.components
    assert _relative(measured["update_saved"], saved.bytes) < SAVED_TOLERANCE, (measured["update_saved"], saved.bytes)
    assert _relative(measured["update_live"], live.peak) < LIVE_TOLERANCE, (measured["update_live"], live.peak)

    states, decoded = memory.rollout_call_states(config)
    latents = adapter.initial_latents(states, sample.resolution, generator)
    prompts = adapter.encode_prompts([f"a prompt {i}" for i in range(states)])
    sigmas = torch.full((states,), 0.5)
    with torch.no_grad(), tracing.LiveBytes([*model_tensors, latents, sigmas, *prompts.tensors.values()]) as call:
        adapter.velocity(latents, sigmas, prompts)
    assert _relative(measured["rollout_call_live"], call.peak) < LIVE_TOLERANCE, (measured["rollout_call_live"], call.peak)
    latents = adapter.initial_latents(decoded, sample.resolution, generator)
    with torch.no_grad(), tracing.LiveBytes([*model_tensors, latents]) as call:
        adapter.decode(latents)
    assert _relative(measured["decode_call_live"], call.peak) < LIVE_TOLERANCE, (measured["decode_call_live"], call.peak)


def test_check_fits_gives_advice(tiny) -> None:
    _, report, _, _ = tiny
    check_fits(report, report.peak)
    with pytest.raises(InsufficientMemoryError, match="sample.max_states_per_call|train.gradient_checkpointing"):
        check_fits(report, report.peak // 2)


def test_published_presets_fit_80gb_at_8_processes(capsys: pytest.CaptureFixture) -> None:
    """Every published preset is predicted to fit an 80 GB device per process on 8 processes."""
    assert memory_command.main(["--memory", "--preset", "pickscore_sd3", "--num_processes", "8"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("predicted peak per process: ")
    margins = {}
    for name in PUBLISHED:
        report = predict_memory(load_preset(name), 8)
        margins[name] = (DEVICE_80GB - report.peak) / GIB
        # The shipped bounds (decode_chunk, state buckets) keep the rollout under the update's peak.
        assert report.phase("sampling").total <= report.phase("update").total, (name, report.phase("sampling").total / GIB)
    summary = ", ".join(f"{name} {margin:+.1f} GiB" for name, margin in margins.items())
    assert all(margin > 0 for margin in margins.values()), f"margin to 80 GB per process at 8 processes: {summary}"
