"""How closely an approximate completion mode reproduces TP-GRPO's credit: rewards, turning points, advantages.

Pure tensor functions comparing the completed rewards `R_0 ... R_W` of one completion mode with
the exact mode's, for the same trajectories (docs/algorithm.md, Completion modes). Correlations of
constant inputs are NaN (nothing to correlate); set scores follow the conventions of `set_agreement`.
"""

from __future__ import annotations

import math

import torch

from flow_grpo.algorithm.advantages import group_advantages
from flow_grpo.algorithm.turning_points import step_rewards

__all__ = ["agreement_metrics", "pearson", "set_agreement", "spearman"]


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    """Pearson correlation of two tensors of the same shape (flattened); NaN when either is constant."""
    a, b = a.double().flatten(), b.double().flatten()
    a, b = a - a.mean(), b - b.mean()
    norm = (a.square().sum() * b.square().sum()).sqrt()
    return float(a @ b / norm) if norm > 0 else math.nan


def _ranks(values: torch.Tensor) -> torch.Tensor:
    """Ranks 1 ... n of `values` (n,), ties given their average rank."""
    order = torch.argsort(values, stable=True)
    ranks = torch.empty_like(values, dtype=torch.float64)
    ranks[order] = torch.arange(1, values.numel() + 1, dtype=torch.float64, device=values.device)
    distinct, inverse = torch.unique(values, return_inverse=True)
    totals = torch.zeros(distinct.numel(), dtype=torch.float64, device=values.device).index_add_(0, inverse, ranks)
    counts = torch.bincount(inverse, minlength=distinct.numel()).double()
    return (totals / counts)[inverse]


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation (Pearson of the average ranks) of two tensors of the same shape, flattened."""
    return pearson(_ranks(a.double().flatten()), _ranks(b.double().flatten()))


def set_agreement(approximate: torch.Tensor, exact: torch.Tensor) -> dict[str, float | None]:
    """Precision, recall and Jaccard index of the `approximate` bool set against the `exact` one (same shape).

    Two empty sets agree (1.0 each). Precision with no approximate member, or recall with no exact
    member, is undefined (None) while the other set is not empty.
    """
    both = int((approximate & exact).sum())
    found, wanted = int(approximate.sum()), int(exact.sum())
    union = int((approximate | exact).sum())
    if union == 0:
        return {"precision": 1.0, "recall": 1.0, "jaccard": 1.0}
    return {
        "precision": both / found if found else None,
        "recall": both / wanted if wanted else None,
        "jaccard": both / union,
    }


def agreement_metrics(
    approximate: torch.Tensor,
    exact: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    consistent: bool = True,
    first_step: bool = True,
    balance: bool = True,
    adv_clip_max: float = 5.0,
    global_std: bool = False,
) -> dict[str, float | int | None]:
    """Agreement of one completion mode's credit with the exact mode's over the same T trajectories.

    Args:
        approximate, exact: (T, W + 1) completed rewards `R_0 ... R_W` of the two modes.
        group_ids: (T,) prompt group of each trajectory (for the per-step group advantages).
        consistent, first_step, balance: the turning-point switches (`config.tp`); balancing runs over all T.
        adv_clip_max, global_std: the advantage normalisation (`config.train`).

    Returns:
        `reward_spearman`, `reward_pearson`: of `R_0 ... R_{W-1}` (the completions; `R_W` is the final
        image in both modes); `incremental_sign_agreement`: fraction of `(t, j)` where `sign(d_j)` agrees;
        `tp_{before,after}_{precision,recall,jaccard}` and `tp_{before,after}_count` (this mode's turning
        points, the exact count in `tp_*_count_exact`): before and after balancing; `advantage_pearson`,
        `advantage_spearman`: of the final (T, W) per-step advantages.
    """
    switches = dict(consistent=consistent, first_step=first_step, balance=balance)
    ours, theirs = step_rewards(approximate, **switches), step_rewards(exact, **switches)
    metrics: dict[str, float | int | None] = {
        "reward_spearman": spearman(approximate[:, :-1], exact[:, :-1]),
        "reward_pearson": pearson(approximate[:, :-1], exact[:, :-1]),
        "incremental_sign_agreement": float((ours.incremental.sign() == theirs.incremental.sign()).double().mean()),
    }
    for stage, mine, reference in (
        ("before", ours.candidates, theirs.candidates),
        ("after", ours.turning_points, theirs.turning_points),
    ):
        for name, value in set_agreement(mine, reference).items():
            metrics[f"tp_{stage}_{name}"] = value
        metrics[f"tp_{stage}_count"] = int(mine.sum())
        metrics[f"tp_{stage}_count_exact"] = int(reference.sum())
    clip = dict(adv_clip_max=adv_clip_max, global_std=global_std)
    advantages = group_advantages(ours.rewards, group_ids, **clip)
    reference = group_advantages(theirs.rewards, group_ids, **clip)
    metrics["advantage_pearson"] = pearson(advantages, reference)
    metrics["advantage_spearman"] = spearman(advantages, reference)
    return metrics
