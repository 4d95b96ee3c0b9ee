"""The compile-time benchmark: regional compilation compiles one graph per block kind, the whole model one per phase."""

from __future__ import annotations

import pytest
import torch

from flow_grpo.bench.compile_time import ScopeCosts, deep_narrow_sd3, format_timings, sd3_inputs, time_compilation
from flow_grpo.models.sd3 import SD3Adapter
from flow_grpo.training.compile import PHASES, CompiledPhases
from flow_grpo.training.step import add_lora


def test_regional_and_whole_model_graph_counts() -> None:
    # 3 layers: two dual-attention blocks (one kind) and the last, context-pre-only block (another).
    regional = time_compilation("blocks", layers=3, backend="eager", repeats=1)
    whole = time_compilation("model", layers=3, backend="eager", repeats=1)
    assert [t.phase for t in regional] == list(PHASES) == [t.phase for t in whole]
    assert [t.graphs for t in whole] == [1, 1, 1]
    # One graph per kind and phase: the first block's streams require a gradient like the later ones'.
    assert [t.graphs for t in regional] == [2, 2, 2]
    assert all(t.compile_s >= 0 and t.steady_s > 0 and t.first_cpu_s > 0 for t in regional + whole)
    costs = [ScopeCosts("blocks", 1.0, 2.0, 3.0, 4), ScopeCosts("model", 5.0, 6.0, 7.0, 8)]
    lines = format_timings(regional + whole, costs).splitlines()
    assert lines[-1].startswith("whole model / regional: ") and "(cpu " in lines[-1]
    assert lines[7] == (
        "blocks: dynamo tracing 1.0 s, waiting for C++ kernels 2.0 s, the rest (AOT autograd, inductor lowering "
        f"and codegen) {sum(t.compile_s for t in regional) - 3.0:.1f} s; 4 C++ kernels, compile workers 3.0 cpu s"
    )


def _lora_grads(transformer: torch.nn.Module, forward) -> dict[str, torch.Tensor]:
    transformer.train()
    transformer.zero_grad(set_to_none=True)
    forward(**sd3_inputs(2), return_dict=False)[0].square().mean().backward()
    return {name: p.grad.clone() for name, p in transformer.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "gradient_checkpointing"])
def test_policy_graph_per_kind_keeps_the_lora_gradients(checkpointing: bool) -> None:
    # The first block's streams are made to require a gradient (one policy graph per kind); with gradient
    # checkpointing the blocks get them as positional arguments. The LoRA gradients stay those of the model.
    torch._dynamo.reset()
    transformer = deep_narrow_sd3(3)
    add_lora(transformer, 4, 4, SD3Adapter.lora_target_modules, seed=0)
    with torch.no_grad():  # a non-zero LoRA B, so every LoRA matrix gets a gradient
        for param in transformer.parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn(param.shape, generator=torch.Generator().manual_seed(param.numel())))
    if checkpointing:
        transformer.enable_gradient_checkpointing()
    plain = _lora_grads(transformer, transformer)
    compiled = CompiledPhases(transformer, transformer, 2, dict.fromkeys(PHASES, 1), backend="eager")
    traced = _lora_grads(transformer, compiled.policy)
    assert compiled.graphs_by_kind() == {"JointTransformerBlock": {"policy": 1}, "JointTransformerBlock/2": {"policy": 1}}
    assert all(grad.abs().sum() > 0 for name, grad in plain.items() if name.startswith("transformer_blocks.0."))
    assert plain.keys() == traced.keys()
    for name, expected in plain.items():
        torch.testing.assert_close(traced[name], expected, rtol=1e-5, atol=1e-7)
