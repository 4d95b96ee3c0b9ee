"""The completion agreement report: its metrics, and the command on `tiny_tp_grpo,tiny`."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import scipy.stats
import torch

from flow_grpo.algorithm.agreement import agreement_metrics, pearson, set_agreement, spearman
from flow_grpo.sampling.agreement import FIGURE_PANELS, agreement_figure

ROOT = Path(__file__).resolve().parents[1]


def test_correlations_match_scipy_with_ties() -> None:
    generator = torch.Generator().manual_seed(0)
    a = torch.randint(0, 5, (40,), generator=generator).float()  # many ties
    b = a + torch.randn(40, generator=generator)
    assert spearman(a, b) == pytest.approx(scipy.stats.spearmanr(a.double(), b.double()).statistic, abs=1e-12)
    assert pearson(a, b) == pytest.approx(scipy.stats.pearsonr(a.double(), b.double()).statistic, abs=1e-12)
    assert math.isnan(pearson(torch.ones(5), b[:5]))


def test_set_agreement_conventions() -> None:
    none = torch.zeros(4, dtype=torch.bool)
    some = torch.tensor([True, True, False, False])
    other = torch.tensor([True, False, True, False])
    assert set_agreement(none, none) == {"precision": 1.0, "recall": 1.0, "jaccard": 1.0}
    assert set_agreement(none, some) == {"precision": None, "recall": 0.0, "jaccard": 0.0}
    assert set_agreement(some, other) == {"precision": 0.5, "recall": 0.5, "jaccard": pytest.approx(1 / 3)}


def test_identical_rewards_agree_and_perturbed_ones_less() -> None:
    generator = torch.Generator().manual_seed(1)
    exact = torch.randn(24, 5, generator=generator)
    groups = torch.arange(24) // 4
    same = agreement_metrics(exact.clone(), exact, groups)
    assert all(value == pytest.approx(1.0) for key, value in same.items() if not key.startswith("tp_") or "count" not in key)
    assert same["tp_after_count"] == same["tp_after_count_exact"] > 0
    noisy = agreement_metrics(exact + 0.8 * torch.randn(24, 5, generator=generator), exact, groups)
    assert noisy["reward_pearson"] < 0.95 and noisy["incremental_sign_agreement"] < 1.0 and noisy["advantage_pearson"] < 0.99


def _metrics(value: float) -> dict:
    keys = [key for lines in FIGURE_PANELS.values() for key, _ in lines]
    return {key: value for key in keys}


def test_figure_has_a_panel_per_metric_with_axes_and_legend() -> None:
    report = {
        "settings": {"trajectories": 8, "num_steps": 4, "window_size": 2, "rewards": {"jpeg_compressibility": 1.0}},
        "modes": {"0": _metrics(1.0), "1": _metrics(0.5), "2": {**_metrics(0.9), "tp_before_precision": None}},
    }
    figure = agreement_figure(report)
    axes = figure.axes
    assert [ax.get_title() for ax in axes] == list(FIGURE_PANELS)
    for ax, lines in zip(axes, FIGURE_PANELS.values()):
        assert ax.get_xlabel() == "completion steps k" and ax.get_ylabel()
        assert [text.get_text() for text in ax.get_legend().get_texts()] == [label for _, label in lines]
        assert list(ax.lines[0].get_xdata()) == [1, 2]  # exact is the reference, not a point


def test_command_on_the_tiny_preset(tiny_sd3_real_dir: str, tmp_path: Path) -> None:
    """N = 4 under `,tiny`: k = 4 covers every remaining step, so it agrees exactly, at the exact cost."""
    out = tmp_path / "agreement"
    command = [
        sys.executable, str(ROOT / "scripts" / "tp_agreement.py"), f"--config={ROOT}/config/grpo.py:tiny_tp_grpo,tiny",
        f"--config.pretrained.model={tiny_sd3_real_dir}", "--completion_steps=1,4", "--batches=2", f"--out={out}",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / "agreement.json").read_text())
    assert (out / "agreement.png").stat().st_size > 0
    settings = report["settings"]
    assert (settings["num_steps"], settings["window_size"], settings["trajectories"]) == (4, 2, 16)
    covering, one_step = report["modes"]["4"], report["modes"]["1"]
    for key in ("reward_spearman", "reward_pearson", "incremental_sign_agreement", "tp_before_jaccard",
                "tp_after_jaccard", "tp_after_precision", "tp_after_recall", "advantage_pearson"):
        assert covering[key] == pytest.approx(1.0, abs=1e-9), key
    assert covering["rows_per_trajectory"] == report["modes"]["0"]["rows_per_trajectory"]
    assert one_step["rows_per_trajectory"] == 4.0  # one transformer call per grid step, as Flow-GRPO
    assert one_step["reward_pearson"] < 1.0
    printed = done.stdout.strip().splitlines()
    assert printed[-5].startswith("| mode") and printed[-3].startswith("| exact") and printed[-2].startswith("| k = 1") and printed[-1].startswith("| k = 4")
