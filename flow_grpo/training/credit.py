"""Credit assignment of an epoch: the gathered rewards turned into per-step advantages (docs/algorithm.md).

Flow-GRPO gives every window step the group-normalised final reward; TP-GRPO first turns the
completed rewards `R_0 ... R_W` into step rewards (incremental rewards, turning points, balancing),
then normalises those per step within each prompt group. Both see the whole epoch batch, gathered
from every process, so groups that span processes and the balancing are computed alike everywhere.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import ml_collections
import torch
from accelerate import Accelerator

from flow_grpo.algorithm.advantages import broadcast_to_steps, group_advantages
from flow_grpo.algorithm.turning_points import StepRewards, step_rewards, summarize
from flow_grpo.training.epoch import EpochSamples

__all__ = ["EpochCredit", "epoch_credit", "group_metrics"]


@dataclass
class EpochCredit:
    """The gathered epoch's credit.

    Attributes:
        advantages: (B, W) advantages of every trajectory of the epoch (all processes, rank-major).
        scored: the rewards they come from: (B, W + 1) completed rewards (TP-GRPO) or (B,) final rewards.
        step_rewards: TP-GRPO's step rewards and turning points; None for Flow-GRPO.
        metrics: `reward/`, `data/` and `tp/` metrics of the epoch.
    """

    advantages: torch.Tensor
    scored: torch.Tensor
    step_rewards: StepRewards | None
    metrics: dict[str, float]


def group_metrics(group_ids: torch.Tensor, group_size: int, num_processes: int) -> dict[str, float]:
    """Check that every group of the gathered epoch (`group_ids` (B,), rank-major) has `group_size` members;
    report the number of groups and how many span processes."""
    counts = torch.bincount(group_ids)
    present = counts[counts > 0]
    if not torch.all(present == group_size):
        raise RuntimeError(f"group sizes {present.tolist()} differ from sample.group_size={group_size}")
    ranks = torch.arange(num_processes, device=group_ids.device).repeat_interleave(group_ids.shape[0] // num_processes)
    lowest = torch.full_like(counts, num_processes).scatter_reduce(0, group_ids, ranks, "amin")
    highest = torch.full_like(counts, -1).scatter_reduce(0, group_ids, ranks, "amax")
    spanning = ((highest > lowest) & (counts > 0)).sum()
    return {"data/groups": float(present.numel()), "data/groups_across_processes": float(spanning)}


def epoch_credit(
    config: ml_collections.ConfigDict, accelerator: Accelerator, samples: EpochSamples, detail_names: Iterable[str] = ()
) -> EpochCredit:
    """Gather this epoch's rewards from every process and compute the advantages of all trajectories.

    `detail_names`: rewards' per-image details (e.g. GenEval's per-task correctness), NaN where a
    detail does not apply; their metrics are means over the images they apply to (none: not logged).
    """
    group_ids = accelerator.gather(samples.group_ids)
    metrics = group_metrics(group_ids, config.sample.group_size, accelerator.num_processes)
    details = set(detail_names)
    for name, value in samples.rewards.items():
        gathered = accelerator.gather(value).float()
        if name in details:
            gathered = gathered[torch.isfinite(gathered)]
            if not gathered.numel():
                continue
        metrics[f"reward/{name}"] = gathered.mean().item()
    clip = dict(adv_clip_max=config.train.adv_clip_max, global_std=config.train.global_std)
    if config.algorithm == "tp_grpo":
        scored = accelerator.gather(samples.completed_rewards)
        result = step_rewards(scored, consistent=config.tp.consistent, first_step=config.tp.first_step, balance=config.tp.balance)
        metrics.update({f"tp/{key}": value for key, value in summarize(result).items()})
        metrics["reward/baseline_R0"] = scored[:, 0].mean().item()
        return EpochCredit(group_advantages(result.rewards, group_ids, **clip), scored, result, metrics)
    scored = accelerator.gather(samples.rewards["avg"])
    advantages = broadcast_to_steps(group_advantages(scored, group_ids, **clip), config.sample.window_size)
    return EpochCredit(advantages, scored, None, metrics)
