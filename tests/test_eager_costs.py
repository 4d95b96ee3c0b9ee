"""Eager per-step costs: no host synchronisation inside a rollout step or a training micro-step, and a LoRA
projection under autocast costs its four ops (and one copy of a strided input) but no casts."""

from __future__ import annotations

import pytest
import torch
from peft.tuners.lora import LoraLayer

from flow_grpo.bench.eager_costs import OpCounter, count_rollout, count_training, format_costs, rollout_rows, training_rows
from flow_grpo.bench.models import build_models
from flow_grpo.bench.settings import default_settings
from flow_grpo.testing.architectures import model_spec
from flow_grpo.training.step import adapters_disabled

CPU = torch.device("cpu")


@pytest.fixture
def models_bf16():
    """The benchmark's tiny models in bf16 under CPU autocast, as a GPU run has them. TP-GRPO's completions take
    3 Euler steps over 8 grid steps, so two branches in one call step to different grid points (those forked
    at 0 and 1 meet at 3, then go to 5 and 6). Built per test: each test drops accelerate's bf16 state (conftest)."""
    settings = default_settings("tiny", dtype="bf16", device="cpu", num_steps=8, window_size=4, completion_steps=(3,))
    return build_models(model_spec("tiny"), settings, CPU, "bf16", optimized=False), settings


def test_counter_counts_the_ops_that_wait_for_the_device() -> None:
    values = torch.arange(6.0)
    counter = OpCounter(CPU)
    with counter:
        float(values.sum())  # a value read
        values[values > 2.0]  # boolean-mask indexing: the output size depends on the values
        values.nonzero()
        torch.tensor([1.0, 2.0])  # host data
        values.view(2, 3) * 2  # one view, one kernel
    counts = counter.total([-1])
    assert counts.syncs == 4 and set(counts.syncs_by_op) == {"aten._local_scalar_dense", "aten.index", "aten.nonzero", "aten.lift_fresh"}
    assert counts.ops["aten.mul"] == 1 and counts.views >= 1
    # On a device, only ops on device tensors wait for it; host tensors (the sigma grid, AdamW's step) do not.
    device_counter = OpCounter(torch.device("cuda"))
    with device_counter:
        float(values.sum())
    assert device_counter.total([-1]).syncs == 0


@pytest.mark.parametrize("branches", [False, True], ids=["flow_grpo", "tp_grpo"])
def test_rollout_steps_do_not_synchronise(models_bf16, branches: bool) -> None:
    models, settings = models_bf16
    counter = count_rollout(models, settings, branches)
    steps = range(settings.num_steps)
    assert counter.step == settings.num_steps  # one transformer call per grid step, then the decodes
    assert counter.total(steps).syncs == 0, counter.total(steps).syncs_by_op
    assert counter.total(steps, "transformer").kernels > 0 and counter.total(steps, "sampler").kernels > 0
    # A Flow-GRPO step has no branch states to join: the main states go to the transformer without a copy;
    # the cats left prepare the next call's CFG batch (prompt embeddings, pooled, latents, timesteps).
    if not branches:
        assert counter.total(range(settings.num_steps - 1), "sampler").ops["aten.cat"] == 4 * (settings.num_steps - 1)
    table = format_costs(rollout_rows("rollout", counter, settings.num_steps), "heading")
    assert table.splitlines()[2].startswith("rollout step: transformer call")


def test_training_micro_steps_do_not_synchronise(models_bf16) -> None:
    models, settings = models_bf16
    counter = count_training(models, settings)
    micro_steps = range(counter.step + 1)
    assert len(micro_steps) == settings.window_size  # one micro-batch of all prompts, one micro-step per window step
    for label in ("policy", "reference", "loss", "backward"):
        assert counter.total(micro_steps, label).syncs == 0, (label, counter.total(micro_steps, label).syncs_by_op)
    # The update reads the non-finite flag once (and, on the CPU, AdamW's host-side step counters).
    update = counter.total(micro_steps, "update").syncs_by_op
    assert set(update) == {"aten._local_scalar_dense"} and update["aten._local_scalar_dense"] == 1 + len(models.trainable)
    assert [title for title, _ in training_rows(counter)][-1].startswith("once per update")


def test_lora_under_autocast_adds_its_products_and_no_casts(models_bf16) -> None:
    models, _ = models_bf16
    transformer = models.adapter.transformer
    projections = sum(isinstance(m, LoraLayer) for m in transformer.modules())
    assert projections == 15  # 8 attention projections in the first block, 7 in the context-pre-only last one
    generator = torch.Generator().manual_seed(0)
    inputs = {
        "hidden_states": torch.randn(2, 16, 8, 8, generator=generator).bfloat16(),
        "timestep": torch.tensor([500.0, 500.0]),
        "encoder_hidden_states": torch.randn(2, 8, transformer.config.joint_attention_dim, generator=generator).bfloat16(),
        "pooled_projections": torch.randn(2, transformer.config.pooled_projection_dim, generator=generator).bfloat16(),
    }

    def second_call(lora: bool) -> tuple[OpCounter, torch.Tensor]:
        # Two calls in one autocast region: the first also casts the float32 LoRA weights (cached after).
        counter = OpCounter(CPU)
        with torch.no_grad(), models.autocast():
            transformer(**inputs, return_dict=False)
            with counter:
                counter.next_step()
                output = transformer(**inputs, return_dict=False)[0]
        return counter, output

    with adapters_disabled(transformer):
        base, _ = second_call(lora=False)
    with_lora, output = second_call(lora=True)
    added = with_lora.total([0]).ops
    added.subtract(base.total([0]).ops)
    # The output projections take the two parts of the joint attention output, strided slices that a linear
    # layer copies to a contiguous block: the LoRA's first matrix copies them once more.
    strided = sum(isinstance(m, LoraLayer) and name.endswith(("to_out.0", "to_add_out")) for name, m in transformer.named_modules())
    assert strided == 3
    expected = {"aten.mm": 2 * projections, "aten.mul": projections, "aten.add": projections, "aten.clone": strided}
    assert {op: n for op, n in added.items() if n} == expected
    # peft's cast of the input to float32 (undone by autocast) gives the same result: it only cost two copies.
    for module in transformer.modules():
        if isinstance(module, LoraLayer):
            module.cast_input_dtype_enabled = True
    try:
        casting, cast_output = second_call(lora=True)
    finally:
        for module in transformer.modules():
            if isinstance(module, LoraLayer):
                module.cast_input_dtype_enabled = False
    assert torch.equal(output, cast_output)
    assert casting.total([0]).ops["aten._to_copy"] - with_lora.total([0]).ops["aten._to_copy"] == 2 * projections
