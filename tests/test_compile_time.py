"""The compile-time benchmark: regional compilation compiles one graph per block kind, the whole model one per phase."""

from __future__ import annotations

from flow_grpo.bench.compile_time import format_timings, time_compilation
from flow_grpo.training.compile import PHASES


def test_regional_and_whole_model_graph_counts() -> None:
    # 3 layers: two dual-attention blocks (one kind) and the last, context-pre-only block (another).
    regional = time_compilation("blocks", layers=3, backend="eager", repeats=1)
    whole = time_compilation("model", layers=3, backend="eager", repeats=1)
    assert [t.phase for t in regional] == list(PHASES) == [t.phase for t in whole]
    assert [t.graphs for t in whole] == [1, 1, 1]
    # The policy phase's first block sees inputs without gradients: one more graph of its kind.
    assert [t.graphs for t in regional] == [2, 3, 2]
    assert all(t.compile_s >= 0 and t.steady_s > 0 for t in regional + whole)
    table = format_timings(regional + whole)
    assert table.splitlines()[-1].startswith("whole model / regional: ")
