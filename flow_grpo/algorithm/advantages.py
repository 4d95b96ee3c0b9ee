"""Per-prompt group normalisation of rewards into advantages (docs/algorithm.md).

Flow-GRPO normalises the final reward once per group and uses the same advantage at every
trained step; TP-GRPO normalises each window-step column of the per-step rewards on its own.
Before the update, trajectories whose advantage is 0 at every trained step are dropped
(`informative_rows`): they carry no gradient and would only dilute the mean loss.
"""

from __future__ import annotations

import torch

__all__ = ["group_advantages", "broadcast_to_steps", "informative_rows"]


def _check_group_inputs(rewards: torch.Tensor, group_ids: torch.Tensor, adv_clip_max: float) -> None:
    """Shapes and dtypes of `group_advantages`' inputs; ValueError naming the problem."""
    if rewards.dim() not in (1, 2):
        raise ValueError(f"rewards must have shape (B,) or (B, W), got {tuple(rewards.shape)}")
    if not rewards.is_floating_point():
        raise ValueError(f"rewards must be a floating-point tensor, got dtype {rewards.dtype}")
    if group_ids.dim() != 1 or group_ids.shape[0] != rewards.shape[0]:
        raise ValueError(
            f"group_ids must have shape ({rewards.shape[0]},), got {tuple(group_ids.shape)}"
        )
    if group_ids.is_floating_point() or group_ids.is_complex() or group_ids.dtype == torch.bool:
        raise ValueError(f"group_ids must be an integer tensor, got dtype {group_ids.dtype}")
    if adv_clip_max <= 0:
        raise ValueError(f"adv_clip_max must be positive, got {adv_clip_max}")


def group_advantages(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    adv_clip_max: float = 5.0,
    global_std: bool = False,
    eps: float = 1e-4,
) -> torch.Tensor:
    """Normalise rewards within groups of the same prompt.

    ``A = (r - mean_group) / (std + eps)``, clipped to ``[-adv_clip_max, adv_clip_max]``.
    The mean is always per group. The std is the population std (``unbiased=False``) per group,
    or, with ``global_std``, the population std of the whole batch (per column). A 2-D input is
    normalised column by column, independently. Rows of a group whose rewards in a column are
    all equal get an advantage of exactly 0 in that column (no float residue from the mean).

    Args:
        rewards: (B,) final rewards (Flow-GRPO) or (B, W) per-step rewards (TP-GRPO), float.
        group_ids: (B,) integer group id per row; rows with the same id share a prompt. Ids are
            arbitrary integers (need not be contiguous or sorted).
        adv_clip_max: clip bound on the absolute advantage.
        global_std: take the std over the whole batch instead of per group.
        eps: added to the std before dividing.

    Returns:
        Advantages with the shape of ``rewards``, in ``rewards``' dtype promoted to at least
        float32.

    Raises:
        ValueError: on wrong shapes or dtypes.
    """
    _check_group_inputs(rewards, group_ids, adv_clip_max)
    dtype = torch.promote_types(rewards.dtype, torch.float32)
    values = rewards.to(dtype)
    was_1d = values.dim() == 1
    if was_1d:
        values = values.unsqueeze(1)  # (B, 1)
    num_columns = values.shape[1]

    unique_ids, group_index = torch.unique(group_ids, return_inverse=True)  # (B,) in [0, G)
    group_index = group_index.to(values.device)
    num_groups = unique_ids.numel()
    counts = torch.bincount(group_index, minlength=num_groups).to(dtype).unsqueeze(1)  # (G, 1)

    sums = values.new_zeros(num_groups, num_columns).index_add_(0, group_index, values)
    group_mean = sums / counts  # (G, C)
    centered = values - group_mean[group_index]  # (B, C)

    if global_std:
        std = values.std(dim=0, correction=0, keepdim=True)  # (1, C)
    else:
        squares = values.new_zeros(num_groups, num_columns).index_add_(
            0, group_index, centered.square()
        )
        std = (squares / counts).sqrt()[group_index]  # (B, C)

    # A group whose column is constant has exactly zero advantage; the mean above may differ
    # from the common value by rounding, which would otherwise leave a tiny non-zero residue.
    expanded_index = group_index.unsqueeze(1).expand(-1, num_columns)
    group_max = values.new_full((num_groups, num_columns), float("-inf")).scatter_reduce(
        0, expanded_index, values, reduce="amax"
    )
    group_min = values.new_full((num_groups, num_columns), float("inf")).scatter_reduce(
        0, expanded_index, values, reduce="amin"
    )
    constant = (group_max == group_min)[group_index]  # (B, C)

    advantages = centered / (std + eps)
    advantages = torch.where(constant, torch.zeros_like(advantages), advantages)
    advantages = advantages.clamp(-adv_clip_max, adv_clip_max)
    return advantages.squeeze(1) if was_1d else advantages


def broadcast_to_steps(advantages: torch.Tensor, num_steps: int) -> torch.Tensor:
    """Repeat one advantage per trajectory over its trained steps (Flow-GRPO).

    Args:
        advantages: (B,) per-trajectory advantages.
        num_steps: W, the number of trained window steps.

    Returns:
        (B, W) contiguous tensor with ``out[i, j] = advantages[i]``.

    Raises:
        ValueError: if ``advantages`` is not 1-D or ``num_steps < 1``.
    """
    if advantages.dim() != 1:
        raise ValueError(f"advantages must have shape (B,), got {tuple(advantages.shape)}")
    if num_steps < 1:
        raise ValueError(f"num_steps must be at least 1, got {num_steps}")
    return advantages.unsqueeze(1).expand(-1, num_steps).contiguous()


def informative_rows(advantages: torch.Tensor, num_micro_batches: int, generator: torch.Generator) -> torch.Tensor:
    """Rows to train on: those with a non-zero advantage at some step, padded to fill the micro-batches.

    The number of micro-batches stays `num_micro_batches` (every process must take the same
    number of optimizer steps); the micro-batches shrink instead. When the informative count is
    not a multiple of `num_micro_batches` (or is zero), randomly drawn uninformative rows are
    added back until it is (at least one row per micro-batch), as the published runs do.

    Args:
        advantages: (B, W) advantages of this process's trajectories; B a multiple of `num_micro_batches`.
        num_micro_batches: micro-batches per epoch on this process.
        generator: CPU generator choosing the re-added rows.

    Returns:
        (K,) sorted int64 row indices on `advantages`' device, K a positive multiple of `num_micro_batches`.
    """
    rows = advantages.shape[0]
    if num_micro_batches < 1 or rows % num_micro_batches:
        raise ValueError(f"{rows} rows cannot be split into {num_micro_batches} micro-batches")
    informative = (advantages != 0).any(dim=1).cpu()
    kept = int(informative.sum())
    target = max(-(-kept // num_micro_batches), 1) * num_micro_batches
    dropped = torch.nonzero(~informative).flatten()
    readded = dropped[torch.randperm(dropped.numel(), generator=generator)[: target - kept]]
    informative[readded] = True
    return torch.nonzero(informative).flatten().to(advantages.device)
