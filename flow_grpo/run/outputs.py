"""Files the evaluation and generation tools write: PNG images, per-image score CSVs, JSON reports."""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

__all__ = ["save_png", "strict_json_value", "summarize_scores", "write_json", "write_jsonl", "write_scores_csv"]


def save_png(image: torch.Tensor, path: str | os.PathLike[str]) -> None:
    """Write one image `(3, H, W)` in [0, 1] as an 8-bit PNG."""
    pixels = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    Image.fromarray(pixels).save(path, format="PNG")


def summarize_scores(records: Sequence[Mapping[str, Any]], names: Sequence[str]) -> dict[str, dict[str, float | int | None]]:
    """Per reward name: mean, population std, min and max over the finite scores, and how many were not finite.

    With no finite score the statistics are None (strict JSON has no NaN).
    """
    summary = {}
    for name in names:
        values = np.asarray([record[name] for record in records], dtype=np.float64)
        finite = values[np.isfinite(values)]
        stats = (finite.mean(), finite.std(), finite.min(), finite.max()) if finite.size else (None,) * 4
        summary[name] = {key: None if v is None else float(v) for key, v in zip(("mean", "std", "min", "max"), stats)}
        summary[name]["nonfinite"] = int(values.size - finite.size)
    return summary


def strict_json_value(value: Any) -> Any:
    """`value` with every NaN / inf float replaced by None (recursively), so it dumps as strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {key: strict_json_value(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json_value(item) for item in value]
    return value


def write_scores_csv(path: str | os.PathLike[str], records: Sequence[Mapping[str, Any]], names: Sequence[str]) -> None:
    """One row per image: prompt index, sample index, seed, prompt, [image file,] one column per reward."""
    columns = ["prompt_index", "image_index", "seed", "prompt"]
    if records and "image" in records[0]:
        columns.append("image")
    columns += list(names)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for record in records:
            writer.writerow({key: record[key] for key in columns})


def write_json(path: str | os.PathLike[str], value: Any) -> None:
    """Write `value` as indented strict UTF-8 JSON (NaN / inf as null) with a final newline."""
    with open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps(strict_json_value(value), indent=2, ensure_ascii=False, allow_nan=False) + "\n")


def write_jsonl(path: str | os.PathLike[str], rows: Sequence[Any]) -> None:
    """Write one strict JSON value per line (UTF-8; NaN / inf as null)."""
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(strict_json_value(row), ensure_ascii=False, allow_nan=False) + "\n")
