"""The completion agreement report: do cheap TP-GRPO completions give the exact completions' credit?

For a preset's model, prompts and reward, `run_agreement` samples TP-GRPO rollouts with exact
completions and, from the same window states (replayed, `rollout(window_next_latents=...)`) and
the same initial noise, with each approximate mode `tp.completion_steps = k`. It scores every
completed image with the preset's reward and compares each mode's rewards, turning points and
advantages with the exact ones (`flow_grpo.algorithm.agreement`), next to what each mode cost:
rollout seconds and transformer rows. It writes `agreement.json` and `agreement.png`
(docs/algorithm.md, Completion modes).
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ml_collections
import torch
from accelerate import PartialState
from accelerate.logging import get_logger
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from flow_grpo.command_flags import InputValueError
from flow_grpo.algorithm.agreement import agreement_metrics
from flow_grpo.data import Prompt, resolve_prompts
from flow_grpo.models import ModelAdapter, call_rows
from flow_grpo.rewards import AVERAGE_KEY, MultiReward, build_reward, check_reward_names
from flow_grpo.run.outputs import write_json
from flow_grpo.sampling.generation import load_model
from flow_grpo.sampling.rollouts import RolloutSettings, draw_window_start, rollout
from flow_grpo.seeding import derived_seed

__all__ = ["FIGURE_PANELS", "ModeSamples", "agreement_figure", "format_agreement", "run_agreement", "sample_modes"]

logger = get_logger(__name__)

FIGURE_PANELS: dict[str, tuple[tuple[str, str], ...]] = {
    "completed rewards R_j": (("reward_spearman", "Spearman"), ("reward_pearson", "Pearson")),
    "incremental rewards d_j": (("incremental_sign_agreement", "sign agreement"),),
    "turning points before balancing": (
        ("tp_before_precision", "precision"), ("tp_before_recall", "recall"), ("tp_before_jaccard", "Jaccard"),
    ),
    "turning points after balancing": (
        ("tp_after_precision", "precision"), ("tp_after_recall", "recall"), ("tp_after_jaccard", "Jaccard"),
    ),
    "per-step advantages": (("advantage_pearson", "Pearson"), ("advantage_spearman", "Spearman")),
    "cost (relative to exact)": (("rows_fraction", "transformer rows"), ("seconds_fraction", "rollout seconds")),
}
"""Panel title -> (metric key, legend label) of each line of `agreement_figure`."""


@dataclasses.dataclass
class ModeSamples:
    """What one completion mode gave over every batch.

    Attributes:
        completed_rewards: (T, W + 1) weighted rewards `R_0 ... R_W` of the T trajectories.
        seconds: rollout seconds of each batch (scoring not included).
        rows: transformer states per trajectory (a CFG state is two batch rows), averaged over batches.
    """

    completed_rewards: torch.Tensor
    seconds: list[float]
    rows: float


class _RowCounter:
    """Counts the batch rows of every transformer forward (a pre-hook; the model is unchanged)."""

    def __init__(self, transformer: torch.nn.Module) -> None:
        self.rows = 0
        self._handle = transformer.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        self.rows += call_rows(args, kwargs)

    def remove(self) -> None:
        self._handle.remove()


def _timed_rollout(adapter: ModelAdapter, counter: _RowCounter, **kwargs: Any):
    """`rollout(adapter, **kwargs)`, its seconds (device synchronised) and the transformer rows it ran."""
    if adapter.device.type == "cuda":
        torch.cuda.synchronize(adapter.device)
    counter.rows, started = 0, time.perf_counter()
    result = rollout(adapter, **kwargs)
    if adapter.device.type == "cuda":
        torch.cuda.synchronize(adapter.device)
    return result, time.perf_counter() - started, counter.rows


def _score(reward: MultiReward, images: torch.Tensor, prompts: list[Prompt]) -> torch.Tensor:
    """Weighted rewards (B, W + 1) of completed images (B, W + 1, 3, H, W) of the B `prompts`."""
    per_image = images.shape[1]
    texts = [p.text for p in prompts for _ in range(per_image)]
    metadata = [p.metadata for p in prompts for _ in range(per_image)]
    return reward(images.flatten(0, 1), texts, metadata)[AVERAGE_KEY].float().cpu().view(-1, per_image)


@torch.no_grad()
def sample_modes(
    config: ml_collections.ConfigDict,
    adapter: ModelAdapter,
    reward: MultiReward,
    prompts: Sequence[Prompt],
    modes: Sequence[int],
    batches: int,
) -> tuple[dict[int, ModeSamples], torch.Tensor]:
    """Sample `batches` TP-GRPO batches of `config.sample` exactly and in each of `modes`, from the same states.

    Trajectory t has prompt `t // sample.group_size` (cycling through `prompts`), so groups are the
    preset's size. Each batch draws its window start and noise from `derived_seed(config.seed, batch)`.

    Returns:
        mode -> its samples (mode 0, the exact one, included), and (T,) group ids.
    """
    sample = config.sample
    settings = dataclasses.replace(RolloutSettings.from_config(config), branches=True, uint8_images=True)
    order = [0, *(k for k in modes if k != 0)]
    found: dict[int, dict[str, list]] = {k: {"rewards": [], "seconds": [], "rows": []} for k in order}
    rows_per_state = (2 if adapter.uses_cfg else 1) * sample.batch_size
    counter = _RowCounter(adapter.transformer)
    autocast = torch.autocast(adapter.device.type, dtype=adapter.dtype, enabled=adapter.device.type == "cuda" and adapter.dtype != torch.float32)
    try:
        for b in range(batches):
            rows = range(b * sample.batch_size, (b + 1) * sample.batch_size)
            batch_prompts = [prompts[(t // sample.group_size) % len(prompts)] for t in rows]
            embeds = adapter.encode_prompts([p.text for p in batch_prompts])
            generator = torch.Generator(adapter.device).manual_seed(derived_seed(config.seed, b))
            window_start = draw_window_start(generator, tuple(sample.window_range), sample.window_size)
            noise = adapter.initial_latents(sample.batch_size, sample.resolution, generator)
            replay = None
            for k in order:
                kwargs = dataclasses.asdict(dataclasses.replace(settings, completion_steps=k))
                with autocast:
                    result, seconds, calls = _timed_rollout(
                        adapter, counter, prompts=embeds, window_start=window_start, initial_latents=noise,
                        generator=generator if replay is None else None, window_next_latents=replay, **kwargs,
                    )
                replay = result.next_latents if replay is None else replay
                found[k]["rewards"].append(_score(reward, result.completed_images, batch_prompts))
                found[k]["seconds"].append(seconds)
                found[k]["rows"].append(calls / rows_per_state)
            logger.info(f"agreement: batch {b + 1}/{batches} (window start {window_start}) sampled in modes {order}")
    finally:
        counter.remove()
    samples = {
        k: ModeSamples(torch.cat(v["rewards"]), v["seconds"], sum(v["rows"]) / len(v["rows"])) for k, v in found.items()
    }
    group_ids = torch.arange(batches * sample.batch_size) // sample.group_size
    return samples, group_ids


def _mode_report(config: ml_collections.ConfigDict, mode: ModeSamples, exact: ModeSamples, group_ids: torch.Tensor) -> dict[str, Any]:
    """One mode's agreement metrics with the exact mode and its cost."""
    tp, train = config.tp, config.train
    metrics = agreement_metrics(
        mode.completed_rewards, exact.completed_rewards, group_ids, consistent=tp.consistent, first_step=tp.first_step,
        balance=tp.balance, adv_clip_max=train.adv_clip_max, global_std=train.global_std,
    )
    seconds = sum(mode.seconds) / len(mode.seconds)
    exact_seconds = sum(exact.seconds) / len(exact.seconds)
    return {
        **{key: None if isinstance(value, float) and math.isnan(value) else value for key, value in metrics.items()},
        "rollout_seconds_per_batch": seconds,
        "rows_per_trajectory": mode.rows,
        "rows_fraction": mode.rows / exact.rows,
        "seconds_fraction": seconds / exact_seconds if exact_seconds > 0 else None,
    }


def run_agreement(
    config: ml_collections.ConfigDict, out_dir: str | os.PathLike[str], modes: Sequence[int], batches: int
) -> dict[str, Any]:
    """Sample, score and compare the completion `modes` of `config`'s TP-GRPO rollout; write the report to `out_dir`.

    Writes `agreement.json` (settings and, per mode, every metric of `agreement_metrics` plus the
    cost) and `agreement.png` (`agreement_figure`). One process only.

    Raises:
        ValueError: on a mode below 1, no mode or fewer than one batch.
        InputValueError: when launched on several processes.
    """
    if not modes or any(k < 1 for k in modes) or batches < 1:
        raise ValueError(f"need completion modes k >= 1 (got {list(modes)}) and --batches >= 1 (got {batches})")
    if PartialState().num_processes > 1:
        raise InputValueError("the agreement report runs in one process; launch it without accelerate's several processes")
    weights = dict(config.reward_fn)
    check_reward_names(weights)
    prompts, origin = resolve_prompts("", dataset=config.dataset, split="train")
    adapter = load_model(config, PartialState().device).adapter
    reward = build_reward(weights, adapter.device, config.reward_options.to_dict())
    samples, group_ids = sample_modes(config, adapter, reward, prompts, sorted(set(modes)), batches)
    exact = samples[0]
    sample = config.sample
    report = {
        "settings": {
            "model": config.pretrained.model, "family": config.pretrained.family, "prompts": origin,
            "rewards": weights, "batches": batches, "batch_size": sample.batch_size, "group_size": sample.group_size,
            "num_steps": sample.num_steps, "window_size": sample.window_size, "window_range": list(sample.window_range),
            "resolution": sample.resolution, "seed": config.seed, "dtype": str(adapter.dtype).removeprefix("torch."),
            "device": str(adapter.device), "trajectories": int(group_ids.numel()),
        },
        "null_means": "a correlation of constant values, or a precision / recall with an empty set on one side",
        "modes": {str(k): _mode_report(config, samples[k], exact, group_ids) for k in samples},
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "agreement.json", report)
    figure = agreement_figure(report)
    figure.savefig(out / "agreement.png")
    logger.info(f"agreement report written to {out / 'agreement.json'} and {out / 'agreement.png'}")
    return report


def agreement_figure(report: dict[str, Any]) -> Figure:
    """One panel per metric group of `FIGURE_PANELS` against the completion steps k, exact (k = 0) excluded."""
    modes = sorted(int(k) for k in report["modes"] if k != "0")
    figure = Figure(figsize=(4.2 * 3, 3.4 * 2), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.subplots(2, 3)
    for ax, (title, lines) in zip(axes.flat, FIGURE_PANELS.items()):
        for key, label in lines:
            values = [report["modes"][str(k)][key] for k in modes]
            ax.plot(modes, [float("nan") if v is None else v for v in values], marker="o", label=label)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("completion steps k")
        ax.set_ylabel("fraction of exact" if title.startswith("cost") else "agreement with exact")
        ax.set_xticks(modes)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    settings = report["settings"]
    figure.suptitle(
        f"completion agreement with exact: {settings['trajectories']} trajectories, "
        f"{settings['num_steps']} steps, window {settings['window_size']}, reward {', '.join(settings['rewards'])}",
        fontsize=10,
    )
    figure.tight_layout()
    return figure


def format_agreement(report: dict[str, Any]) -> str:
    """The report as a markdown table, one row per mode (exact first)."""

    def cell(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f}"

    header = ("mode", "rows/traj", "s/batch", "R Spearman", "R Pearson", "d sign", "TP P/R/J before", "TP P/R/J after", "A Pearson")
    rows = []
    for k, m in sorted(report["modes"].items(), key=lambda item: int(item[0])):
        rows.append((
            "exact" if k == "0" else f"k = {k}", f"{m['rows_per_trajectory']:.1f}", f"{m['rollout_seconds_per_batch']:.3f}",
            cell(m["reward_spearman"]), cell(m["reward_pearson"]), cell(m["incremental_sign_agreement"]),
            "/".join(cell(m[f"tp_before_{n}"]) for n in ("precision", "recall", "jaccard")),
            "/".join(cell(m[f"tp_after_{n}"]) for n in ("precision", "recall", "jaccard")),
            cell(m["advantage_pearson"]),
        ))
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(widths[i]) for i, c in enumerate(row)) + " |" for row in (header, *rows)]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)
