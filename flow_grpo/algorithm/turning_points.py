"""TP-GRPO step-wise rewards: incremental rewards, turning points, aggregation and balancing.

Implements docs/algorithm.md, TP-GRPO: step-wise rewards (balancing over the whole batch that is
passed in, ranked by ``|g_j|``). Everything here is a pure, vectorised tensor function.

Notation, for one trajectory with an SDE window of ``W`` steps and completed rewards
``R_0 ... R_W``:

- incremental reward ``d_j = R_{j+1} - R_j`` (``j = 0 ... W-1``),
- global trend ``Delta = R_W - R_0``, consistency ``c_j = sign(d_j) * sign(Delta)``,
- aggregated long-term reward ``g_j = R_W - R_j``,
- per-step reward ``rho_j = g_j`` at a (balanced) turning point, else ``d_j``; a step with
  ``g_j = 0`` is never a turning point.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["StepRewards", "step_rewards", "summarize"]


@dataclass(frozen=True)
class StepRewards:
    """Per-step rewards of a batch of trajectories; every field has shape (B, W).

    Attributes:
        incremental: float, ``d_j = R_{j+1} - R_j``.
        aggregated: float, ``g_j = R_W - R_j``.
        candidates: bool, turning points before balancing.
        turning_points: bool, turning points after balancing (a subset of ``candidates``).
        rewards: float, ``rho_j = g_j`` where ``turning_points`` else ``d_j``.
    """

    incremental: torch.Tensor
    aggregated: torch.Tensor
    candidates: torch.Tensor
    turning_points: torch.Tensor
    rewards: torch.Tensor


def _validate_completed_rewards(completed_rewards: torch.Tensor) -> None:
    if not isinstance(completed_rewards, torch.Tensor):
        raise ValueError(
            f"completed_rewards must be a torch.Tensor, got {type(completed_rewards).__name__}"
        )
    if completed_rewards.dim() != 2:
        raise ValueError(
            "completed_rewards must be 2-D with shape (B, W+1) holding R_0 ... R_W, "
            f"got shape {tuple(completed_rewards.shape)}"
        )
    if not completed_rewards.is_floating_point():
        raise ValueError(
            "completed_rewards must be a floating-point tensor, "
            f"got dtype {completed_rewards.dtype}"
        )
    if completed_rewards.shape[1] < 2:
        raise ValueError(
            "completed_rewards needs at least 2 columns (R_0 and R_W, i.e. W >= 1), "
            f"got shape {tuple(completed_rewards.shape)}"
        )


def _top_k_members(members: torch.Tensor, magnitude: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Keep the ``k`` members with the largest ``magnitude``.

    Ties are broken by flat (row-major) index: a stable descending sort keeps earlier entries
    first.

    Args:
        members: (N,) bool, the entries that compete.
        magnitude: (N,) float, the ranking key (only read where ``members``).
        k: 0-d integer tensor, how many members to keep.

    Returns:
        (N,) bool, the kept members.
    """
    key = torch.where(members, magnitude, torch.full_like(magnitude, float("-inf")))
    order = torch.sort(key, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=order.device)
    return members & (rank < k)


def _balance(candidates: torch.Tensor, aggregated: torch.Tensor) -> torch.Tensor:
    """Balance turning points between positive and negative ``g_j``.

    Args:
        candidates: (B, W) bool, turning points before balancing.
        aggregated: (B, W) float, ``g_j``.

    Returns:
        (B, W) bool, turning points after balancing.
    """
    flat_candidates = candidates.reshape(-1)
    flat_g = aggregated.reshape(-1)
    positive = flat_candidates & (flat_g > 0)
    negative = flat_candidates & (flat_g < 0)
    num_positive = positive.sum()
    num_negative = negative.sum()
    k = torch.minimum(num_positive, num_negative)
    magnitude = flat_g.abs()
    kept = _top_k_members(positive, magnitude, k) | _top_k_members(negative, magnitude, k)
    both_signs = (num_positive > 0) & (num_negative > 0)
    balanced = torch.where(both_signs, kept, flat_candidates)
    return balanced.reshape(candidates.shape)


def step_rewards(
    completed_rewards: torch.Tensor,
    *,
    consistent: bool = True,
    first_step: bool = True,
    balance: bool = True,
) -> StepRewards:
    """Compute TP-GRPO per-step rewards from completed rewards (docs/algorithm.md, TP-GRPO: step-wise rewards).

    Turning points (sign tests only, ``sign(0) = 0`` so exact zeros never create one):

    - ``j = 0`` (only when ``first_step``): ``sign(d_0) * sign(R_W - R_1) > 0``.
    - ``j >= 1``: ``c_{j-1} < 0`` and ``c_j > 0``, and, when ``consistent``, also
      ``K_j = sign(d_j) * sign(R_W - R_{j+1}) > 0``. With ``consistent`` the last window step is
      never a turning point.

    Balancing (when ``balance``) runs over all ``B`` rows given: candidates are split by the sign
    of ``g_j``. If both signs occur, the ``min(#pos, #neg)`` candidates with the largest ``|g_j|``
    of each sign are kept (ties broken by flat row-major index, earlier first) and the others
    revert to ``rho_j = d_j``. If only one sign occurs, or none, every candidate is kept.

    Zero ``g_j``: a step that passes the sign tests but has ``g_j == 0`` is not a turning point
    (not even a candidate) and keeps ``rho_j = d_j``, as in the reference code. This can only
    happen with ``consistent=False`` (e.g. ``R = [0, 2, 1, 2, 1]``, ``j = 2``): ``K_j`` (and the
    first-step rule) force ``sign(g_j) = sign(d_j) != 0`` because ``g_j = d_j + (R_W - R_{j+1})``.

    Args:
        completed_rewards: (B, W+1) float, ``R_0 ... R_W`` per trajectory, ``W >= 1``.
        consistent: use the consistency condition ``K_j`` (the paper's stricter definition).
        first_step: apply the initial-step rule at ``j = 0``.
        balance: balance positive and negative turning points over the batch.

    Returns:
        StepRewards with (B, W) fields, in the dtype of ``completed_rewards``.

    Raises:
        ValueError: if ``completed_rewards`` is not a 2-D floating tensor with at least 2 columns.
    """
    _validate_completed_rewards(completed_rewards)
    rewards = completed_rewards
    final = rewards[:, -1:]  # (B, 1), R_W

    incremental = rewards[:, 1:] - rewards[:, :-1]  # (B, W), d_j
    aggregated = final - rewards[:, :-1]  # (B, W), g_j
    trend = final - rewards[:, :1]  # (B, 1), Delta

    sign_incremental = torch.sign(incremental)
    consistency = sign_incremental * torch.sign(trend)  # (B, W), c_j
    # sign(d_j) * sign(R_W - R_{j+1}): the K_j test; at j = 0 it is also the initial-step rule.
    keeps_direction = sign_incremental * torch.sign(final - rewards[:, 1:]) > 0  # (B, W)

    candidates = torch.zeros_like(incremental, dtype=torch.bool)
    if first_step:
        candidates[:, 0] = keeps_direction[:, 0]
    later = (consistency[:, :-1] < 0) & (consistency[:, 1:] > 0)  # (B, W-1), for j >= 1
    if consistent:
        later = later & keeps_direction[:, 1:]
    candidates[:, 1:] = later
    candidates &= aggregated != 0  # g_j = 0 (basic definition only): not a turning point, rho_j = d_j

    turning_points = _balance(candidates, aggregated) if balance else candidates.clone()
    per_step = torch.where(turning_points, aggregated, incremental)
    return StepRewards(
        incremental=incremental,
        aggregated=aggregated,
        candidates=candidates,
        turning_points=turning_points,
        rewards=per_step,
    )


def summarize(result: StepRewards) -> dict[str, float]:
    """Logging statistics of a :class:`StepRewards` (one device-to-host transfer).

    Keys:
        ``tp_rate/step_{j}``: fraction of trajectories with a turning point at window step ``j``
        (after balancing); ``tp_rate``: overall turning-point fraction (after balancing);
        ``tp_pos_before`` / ``tp_neg_before``: turning points with ``g_j > 0`` / ``g_j < 0``
        before balancing; ``tp_pos_after`` / ``tp_neg_after``: the same after balancing;
        ``mean_incremental``: mean ``d_j``; ``mean_step_reward``: mean ``rho_j``.

    Args:
        result: the output of :func:`step_rewards`, fields (B, W).

    Returns:
        dict from name to Python float.
    """
    turning_points = result.turning_points
    candidates = result.candidates
    g = result.aggregated
    num_steps = turning_points.shape[1]
    per_step_rate = turning_points.float().mean(dim=0)  # (W,)
    scalars = torch.stack(
        [
            turning_points.float().mean(),
            (candidates & (g > 0)).sum().float(),
            (candidates & (g < 0)).sum().float(),
            (turning_points & (g > 0)).sum().float(),
            (turning_points & (g < 0)).sum().float(),
            result.incremental.float().mean(),
            result.rewards.float().mean(),
        ]
    )
    values = torch.cat([per_step_rate, scalars.to(per_step_rate.device)]).tolist()
    names = [f"tp_rate/step_{j}" for j in range(num_steps)] + [
        "tp_rate",
        "tp_pos_before",
        "tp_neg_before",
        "tp_pos_after",
        "tp_neg_after",
        "mean_incremental",
        "mean_step_reward",
    ]
    return dict(zip(names, values))
