"""The phase benchmark (flow_grpo/bench/, scripts/benchmark.py) on the tiny models, CPU only."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from flow_grpo.bench.flops import component_flops, count_flops, count_phase_flops
from flow_grpo.bench.models import build_models
from flow_grpo.bench.report import format_report, run_benchmark
from flow_grpo.bench.settings import PHASES, BenchmarkSettings, default_settings
from flow_grpo.testing.architectures import model_spec

META = torch.device("meta")
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny_report():
    return run_benchmark(default_settings("tiny", warmup=1, repeats=2))


def test_tiny_benchmark_times_and_counts_every_phase(tiny_report) -> None:
    report = tiny_report
    assert [phase.name for phase in report.phases] == list(PHASES)
    for phase in report.phases:
        assert phase.error is None
        assert phase.seconds > 0 and len(phase.times) == 2 and len(phase.warmup_times) == 1
        assert phase.flops > 0
        assert phase.flops_per_second > 0 and 0 < phase.fraction_of_ceiling
        assert phase.peak_memory_bytes > 0
    assert report.ceiling.flops_per_second > 0
    assert all(value > 0 for value in report.components.values())
    # Lockstep TP-GRPO does the Flow-GRPO work plus the branches and their decodes.
    assert report.phase("tp_grpo_rollout").flops > report.phase("flow_grpo_rollout").flops
    table = format_report(report).splitlines()
    assert table[-len(PHASES) - 2].startswith("| phase")
    assert table[-1].startswith("| GRPO update over the window")


def test_tiny_rollout_flops_follow_the_call_count(tiny_report) -> None:
    """The phase counts are the per-call counts times the calls: CFG doubles the rows, and the
    lockstep rollout advances the main trajectory plus one state per branch forked so far."""
    s = tiny_report.settings
    components = tiny_report.components
    decodes = s.prompts * components["vae_decode_per_image"]
    # Flow-GRPO: N calls on B states of 2 rows, one decode per trajectory; rows carry the LoRA.
    row = (tiny_report.phase("flow_grpo_rollout").flops - decodes) / (s.num_steps * s.prompts * 2)
    assert row > components["transformer_forward_per_row"]  # the LoRA's products on top of the base model
    states = sum(1 + min(k, s.window_size) for k in range(s.num_steps))  # window start 0
    expected = states * s.prompts * 2 * row + (s.window_size + 1) * decodes
    assert tiny_report.phase("tp_grpo_rollout").flops == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("size", ["tiny", "tiny_flux"])
def test_meta_flop_count_equals_the_count_on_real_tensors(size: str) -> None:
    """Counting on the meta device gives exactly the FLOPs of the same phases run on the CPU."""
    settings = default_settings(size, prompts=2, num_steps=3, window_size=2)
    spec = model_spec(size)
    meta = build_models(spec, settings, META, "no", optimized=False)
    real = build_models(spec, settings, CPU, "no", optimized=False)
    assert component_flops(meta, settings) == component_flops(real, settings)
    meta_phases, real_phases = count_phase_flops(meta, settings), count_phase_flops(real, settings)
    assert meta_phases == real_phases and set(meta_phases) == set(PHASES)
    assert all(value > 0 for value in meta_phases.values())


def test_transformer_flops_on_meta_match_the_real_tiny_model() -> None:
    """One forward of the tiny SD3 transformer: the meta count equals the count on real weights."""
    from flow_grpo.testing import tiny_sd3_pipeline

    real = tiny_sd3_pipeline("real").transformer
    with META:
        meta = type(real).from_config(real.config)

    def forward(model: torch.nn.Module, device: torch.device) -> None:
        config = model.config
        model(
            hidden_states=torch.zeros(2, config.in_channels, 8, 8, device=device),
            timestep=torch.ones(2, device=device),
            encoder_hidden_states=torch.zeros(2, 141, config.joint_attention_dim, device=device),
            pooled_projections=torch.zeros(2, config.pooled_projection_dim, device=device),
        )

    counted = count_flops(lambda: forward(meta, META))
    assert counted == count_flops(lambda: forward(real, CPU)) > 0


def test_script_writes_json_and_prints_the_table_last(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out" / "tiny.json"
    from flow_grpo.commands import benchmark as script

    argv = ["--size", "tiny", "--prompts", "2", "--num_steps", "3", "--window_size=2", "--repeats", "1", "--json", str(out)]
    assert script.main(argv + ["--phases", "tp_grpo_rollout,update"]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[-1].startswith("| GRPO update") and printed[-2].startswith("| TP-GRPO rollout")
    data = json.loads(out.read_text())
    assert [phase["name"] for phase in data["phases"]] == ["tp_grpo_rollout", "update"]
    for phase in data["phases"]:
        assert phase["seconds"] > 0 and phase["flops"] > 0 and phase["tflops_per_second"] > 0
    assert data["settings"]["num_steps"] == 3 and data["settings"]["prompts"] == 2
    assert data["matmul_ceiling"]["tflops_per_second"] > 0


def test_count_only_needs_no_timing() -> None:
    report = run_benchmark(default_settings("tiny", count_only=True, phases=("flow_grpo_rollout",)))
    (phase,) = report.phases
    assert phase.flops > 0 and phase.seconds is None and report.ceiling is None
    assert "| Flow-GRPO rollout" in format_report(report).splitlines()[-1]


def test_completion_modes_are_counted_with_their_epoch_ratio(capsys: pytest.CaptureFixture) -> None:
    """k = 1 runs the Flow-GRPO transformer calls and adds W B decodes; the epoch ratio is the documented sum."""
    from flow_grpo.commands import benchmark as script

    settings = default_settings("tiny", count_only=True, completion_steps=(0, 1, 2))
    report = run_benchmark(settings)
    modes = {mode.completion_steps: mode for mode in report.modes}
    assert [mode.rows_per_trajectory for mode in report.modes] == [10, 4, 7]  # N 4, W 3 from 0
    flops = {phase.name: phase.flops for phase in report.phases}
    assert modes[0].rollout_flops == flops["tp_grpo_rollout"]
    decodes = settings.window_size * settings.prompts * report.components["vae_decode_per_image"]
    assert modes[1].rollout_flops == flops["flow_grpo_rollout"] + decodes
    flow = flops["flow_grpo_rollout"] + flops["scoring"] / (settings.window_size + 1) + flops["update"]
    for mode in report.modes:
        assert mode.epoch_ratio == pytest.approx((mode.rollout_flops + flops["scoring"] + flops["update"]) / flow)
    assert modes[1].epoch_ratio < modes[2].epoch_ratio < modes[0].epoch_ratio
    assert script.main(["--size", "tiny", "--count_only", "--completion_steps", "2,1", "--phases", "flow_grpo_rollout"]) == 0
    printed = capsys.readouterr().out
    assert "| k = 2      |                             7 |" in printed and "| k = 1 " in printed
    with pytest.raises(ValueError, match="completion_steps"):
        BenchmarkSettings(completion_steps=(1, 1))


def test_settings_reject_bad_windows_and_buckets() -> None:
    with pytest.raises(ValueError, match="window"):
        BenchmarkSettings(num_steps=10, window_size=10)
    with pytest.raises(ValueError, match="state_buckets"):
        BenchmarkSettings(state_buckets=(36, 18))
    with pytest.raises(ValueError, match="not both"):
        BenchmarkSettings(state_buckets=(18,), max_states_per_call=18)
    with pytest.raises(ValueError, match="phases"):
        BenchmarkSettings(phases=("sampling",))
    with pytest.raises(ValueError, match="size"):
        default_settings("sdxl")


def test_presets_match_the_documented_anchor() -> None:
    """The sd3 preset is docs/performance.md's anchor; the real architectures have the published sizes."""
    s = default_settings("sd3")
    assert (s.prompts, s.resolution, s.num_steps, s.window_size, s.guidance_scale) == (9, 512, 10, 9, 4.5)
    assert (s.step_kind, s.noise_level, s.lora_rank, s.scored_images) == ("cps", 0.7, 32, 90)
    for size, billions in (("sd3", 2.24), ("flux", 11.9)):
        models = build_models(model_spec(size), default_settings(size, phases=("scoring",)), META, "bf16", optimized=False)
        transformer = models.adapter.transformer
        base = sum(p.numel() for name, p in transformer.named_parameters() if "lora_" not in name)
        assert base / 1e9 == pytest.approx(billions, abs=0.01)


@pytest.mark.parametrize("preset", ["tiny_tp_grpo", "tiny_flow_grpo"])
def test_the_benchmark_rollout_is_the_training_rollout(preset: str) -> None:
    """The benchmark times the trainer's own rollout: an epoch's sampling batch and the benchmark's rollout with the
    same settings make the same transformer calls and decode in the same chunks (here 3 images per VAE call)."""
    import config.grpo as presets
    from flow_grpo.bench.phases import benchmark_texts, rollout_phase
    from flow_grpo.training.epoch import _rollout_batch

    config = getattr(presets, preset)()
    sample = config.sample
    sample.decode_chunk, sample.max_states_per_call = 3, 5
    sample.window_range = (1, 1 + sample.window_size)  # the epoch's window draw has one outcome: start 1
    settings = default_settings(
        "tiny", prompts=sample.batch_size, resolution=sample.resolution, num_steps=sample.num_steps,
        window_size=sample.window_size, window_start=1, step_kind=sample.step_kind, noise_level=sample.noise_level,
        decode_chunk=sample.decode_chunk, max_states_per_call=sample.max_states_per_call,
    )
    models = build_models(model_spec("tiny"), settings, CPU, "no", optimized=True)
    adapter = models.adapter
    prompts = adapter.encode_prompts(benchmark_texts(settings.prompts))
    calls: list[tuple[str, int]] = []
    velocity, decode = adapter.velocity, adapter.decode
    adapter.velocity = lambda latents, *args, **kwargs: calls.append(("velocity", len(latents))) or velocity(latents, *args, **kwargs)
    adapter.decode = lambda latents: calls.append(("decode", len(latents))) or decode(latents)
    branches = preset == "tiny_tp_grpo"

    trained = _rollout_batch(config, models.accelerator, adapter, prompts, seed=0)
    training_calls, calls[:] = list(calls), []
    benchmarked = rollout_phase(models, settings, prompts, branches=branches)
    assert calls == training_calls
    images = settings.prompts * (settings.window_size + 1 if branches else 1)
    assert [size for kind, size in calls if kind == "decode"] == [3] * (images // 3) + [images % 3] * (images % 3 > 0)
    assert max(size for kind, size in calls if kind == "velocity") <= 5
    assert benchmarked.images.dtype == trained.images.dtype == torch.uint8
    assert (benchmarked.completed_images is not None) == (trained.completed_images is not None) == branches
