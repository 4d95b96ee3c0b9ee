"""Files the evaluation and generation tools write: PNG images, per-image score CSVs, JSON reports."""

from __future__ import annotations

import csv
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from flow_grpo.command_flags import InputValueError

__all__ = [
    "TOOL_FILES",
    "claim_output_dir",
    "save_png",
    "strict_json_value",
    "summarize_scores",
    "write_json",
    "write_jsonl",
    "write_scores_csv",
]

TOOL_FILES = ("index.jsonl", "settings.json", "summary.json", "scores.csv")
"""What `flow-grpo-generate` and `flow-grpo-evaluate` write in their `--out`, besides `images/PPPPP_II.png`."""

_TOOL_IMAGE = re.compile(r"\d{5}_\d{2}\.png")


def claim_output_dir(out: str | os.PathLike[str], overwrite: bool, remove: bool) -> None:
    """Refuse an `out` that holds a sampling tool's earlier outputs, or with `overwrite` remove them.

    Every process checks (so all refuse alike); only a process with `remove` (the main one) deletes.
    Other files in `out` are never touched.

    Raises:
        InputValueError: `out` holds earlier outputs and `overwrite` is False (naming them and the flag).
    """
    out = Path(out)
    earlier = [out / name for name in TOOL_FILES if (out / name).is_file()]
    images = [path for path in (out / "images").glob("*.png") if _TOOL_IMAGE.fullmatch(path.name)]
    if not earlier and not images:
        return
    if not overwrite:
        found = [path.name for path in earlier] + ([f"{len(images)} images in images/"] if images else [])
        raise InputValueError(
            f"--out {out} already holds the outputs of an earlier run ({', '.join(found)}); "
            "pass --overwrite to replace them, or choose another --out"
        )
    if remove:
        for path in [*earlier, *images]:
            path.unlink()


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
