"""Files the evaluation and generation tools write: PNG images, per-image score CSVs, JSON reports."""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

__all__ = ["save_png", "summarize_scores", "write_json", "write_jsonl", "write_scores_csv"]


def save_png(image: torch.Tensor, path: str | os.PathLike[str]) -> None:
    """Write one image `(3, H, W)` in [0, 1] as an 8-bit PNG."""
    pixels = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    Image.fromarray(pixels).save(path, format="PNG")


def summarize_scores(records: Sequence[Mapping[str, Any]], names: Sequence[str]) -> dict[str, dict[str, float]]:
    """Per reward name: mean, population std, min and max over the records."""
    summary = {}
    for name in names:
        values = np.asarray([record[name] for record in records], dtype=np.float64)
        summary[name] = {
            "mean": float(values.mean()),
            "std": float(values.std()),
            "min": float(values.min()),
            "max": float(values.max()),
        }
    return summary


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
    """Write `value` as indented UTF-8 JSON with a final newline."""
    with open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps(value, indent=2, ensure_ascii=False) + "\n")


def write_jsonl(path: str | os.PathLike[str], rows: Sequence[Any]) -> None:
    """Write one JSON value per line (UTF-8)."""
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
