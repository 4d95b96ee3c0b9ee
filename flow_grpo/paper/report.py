"""The table's files: `table.md` (rows = models, columns = metrics, as the paper's Table 1),
`table.json`, `geneval_tasks.md` (GenEval's per-task table) and `table.png` (a bar chart per metric)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from flow_grpo.run.outputs import write_json
from flow_grpo.paper.geneval_table import format_task_table
from flow_grpo.paper.runner import RowResult
from flow_grpo.paper.suite import Metric

__all__ = ["format_table", "plot_table", "write_report"]


def _cell(value: float, digits: int) -> str:
    return "-" if not math.isfinite(value) else f"{value:.{digits}f}"


def _finite_or_none(value: float) -> float | None:
    """JSON has no NaN: a metric without a value is written as null."""
    return value if math.isfinite(value) else None


def format_table(results: Mapping[str, RowResult], metrics: Sequence[Metric], digits: int = 4) -> str:
    """A Markdown table: one row per model, one column per metric (`-` where a metric has no value)."""
    header = ["Model", *(metric.label for metric in metrics)]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * len(metrics)) + "|"]
    for name, result in results.items():
        cells = [_cell(result.values.get(metric.name, math.nan), digits) for metric in metrics]
        lines.append("| " + " | ".join([name, *cells]) + " |")
    return "\n".join(lines) + "\n"


def plot_table(results: Mapping[str, RowResult], metrics: Sequence[Metric], path: str | Path) -> None:
    """A bar chart per metric (its own scale), one bar per model, saved as PNG to `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = min(len(metrics), 3)
    rows = math.ceil(len(metrics) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.2 * rows), squeeze=False)
    names = list(results)
    colors = [plt.get_cmap("tab10")(index % 10) for index in range(len(names))]
    for axis, metric in zip(axes.flat, metrics):
        values = [results[name].values.get(metric.name, math.nan) for name in names]
        bars = axis.bar(range(len(names)), values, color=colors)
        axis.bar_label(bars, labels=[_cell(value, 3) for value in values], fontsize=8)
        finite = [value for value in values if math.isfinite(value)]
        if finite:  # start near the smallest value so small differences between models stay visible
            low, high = min(finite), max(finite)
            pad = 0.15 * (high - low) or 0.05 * abs(high) or 0.05
            axis.set_ylim(min(0.0, low) if low - pad < 0 <= low else low - pad, high + pad)
        axis.set_title(f"{metric.label} ({metric.benchmark})", fontsize=10)
        axis.set_xticks(range(len(names)), names, rotation=20, ha="right", fontsize=8)
    for axis in list(axes.flat)[len(metrics) :]:
        axis.axis("off")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_report(
    out_dir: str | Path, results: Mapping[str, RowResult], metrics: Sequence[Metric], settings: Mapping[str, Any]
) -> list[Path]:
    """Write `table.md`, `table.json`, `geneval_tasks.md` (when GenEval was scored) and `table.png`; returns the paths."""
    out = Path(out_dir)
    written = [out / "table.md", out / "table.json", out / "table.png"]
    written[0].write_text(format_table(results, metrics), encoding="utf-8")
    write_json(written[1], {
        "columns": [
            {"name": m.name, "label": m.label, "benchmark": m.benchmark, "reward": m.reward, "scale": m.scale}
            for m in metrics
        ],
        "rows": {
            name: {"values": {key: _finite_or_none(value) for key, value in result.values.items()}, **({"geneval": result.geneval.to_dict()} if result.geneval else {})}
            for name, result in results.items()
        },
        "settings": dict(settings),
    })
    plot_table(results, metrics, written[2])
    geneval = {name: result.geneval for name, result in results.items() if result.geneval is not None}
    if geneval:
        written.append(out / "geneval_tasks.md")
        written[-1].write_text(format_task_table(geneval), encoding="utf-8")
    return written
