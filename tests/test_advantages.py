"""Group normalisation of rewards into advantages."""

from __future__ import annotations

import math

import pytest
import torch

from flow_grpo.algorithm.advantages import broadcast_to_steps, group_advantages


def _f64(values: list) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def _ids(values: list[int]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64)


def test_known_small_groups() -> None:
    # Group 0: [1, 3] -> mean 2, population std 1. Group 1: [0, 0, 6] -> mean 2, std sqrt(8).
    rewards = _f64([1.0, 3.0, 0.0, 0.0, 6.0])
    advantages = group_advantages(rewards, _ids([0, 0, 1, 1, 1]), eps=0.0)
    root8 = math.sqrt(8.0)
    torch.testing.assert_close(advantages, _f64([-1.0, 1.0, -2 / root8, -2 / root8, 4 / root8]))


def test_eps_is_added_to_the_std() -> None:
    advantages = group_advantages(_f64([1.0, 3.0]), _ids([5, 5]), eps=0.5)
    torch.testing.assert_close(advantages, _f64([-1 / 1.5, 1 / 1.5]))
    default = group_advantages(_f64([1.0, 3.0]), _ids([5, 5]))
    torch.testing.assert_close(default, _f64([-1 / 1.0001, 1 / 1.0001]))


def test_shuffled_rows_and_non_contiguous_ids() -> None:
    rewards = _f64([1.0, 3.0, 0.0, 0.0, 6.0])
    expected = group_advantages(rewards, _ids([0, 0, 1, 1, 1]))
    permutation = torch.tensor([4, 0, 2, 1, 3])
    shuffled = group_advantages(rewards[permutation], _ids([70, 3, 70, 3, 70]))
    torch.testing.assert_close(shuffled, expected[permutation])


def test_two_dimensional_columns_are_independent() -> None:
    # Column 0: groups [1, 3] and [2, 2]; column 1: groups [10, 0] and [5, 7].
    rewards = _f64([[1.0, 10.0], [3.0, 0.0], [2.0, 5.0], [2.0, 7.0]])
    ids = _ids([0, 0, 1, 1])
    advantages = group_advantages(rewards, ids, eps=0.0)
    expected = _f64([[-1.0, 1.0], [1.0, -1.0], [0.0, -1.0], [0.0, 1.0]])
    torch.testing.assert_close(advantages, expected)
    for column in range(2):
        torch.testing.assert_close(
            advantages[:, column], group_advantages(rewards[:, column], ids, eps=0.0)
        )


def test_global_std() -> None:
    # Per-group means 2 and 11; batch population std of [1, 3, 10, 12] = sqrt(21.25).
    rewards = _f64([1.0, 3.0, 10.0, 12.0])
    advantages = group_advantages(rewards, _ids([0, 0, 1, 1]), global_std=True, eps=0.0)
    std = math.sqrt(21.25)
    torch.testing.assert_close(advantages, _f64([-1 / std, 1 / std, -1 / std, 1 / std]))
    per_group = group_advantages(rewards, _ids([0, 0, 1, 1]), eps=0.0)
    torch.testing.assert_close(per_group, _f64([-1.0, 1.0, -1.0, 1.0]))


def test_global_std_is_per_column() -> None:
    rewards = _f64([[1.0, 0.0], [3.0, 0.0], [10.0, 0.0], [12.0, 4.0]])
    advantages = group_advantages(rewards, _ids([0, 0, 1, 1]), global_std=True, eps=0.0)
    std0 = math.sqrt(21.25)
    std1 = math.sqrt(3.0)  # population std of [0, 0, 0, 4]
    expected = _f64(
        [[-1 / std0, 0.0], [1 / std0, 0.0], [-1 / std0, -2 / std1], [1 / std0, 2 / std1]]
    )
    torch.testing.assert_close(advantages, expected)


def test_clipping() -> None:
    # One outlier in a group of 101: z = 10 before clipping.
    rewards = torch.zeros(101, dtype=torch.float64)
    rewards[0] = 1.0
    advantages = group_advantages(rewards, torch.zeros(101, dtype=torch.int64), eps=0.0)
    assert advantages[0].item() == pytest.approx(5.0)
    assert advantages[1].item() == pytest.approx(-0.1)
    tight = group_advantages(rewards, torch.zeros(101, dtype=torch.int64), adv_clip_max=0.05)
    assert tight.max().item() == pytest.approx(0.05)
    assert tight.min().item() == pytest.approx(-0.05)


def test_constant_group_gives_exact_zeros() -> None:
    # 0.1 * 3 / 3 != 0.1 in floating point; constant groups must still give exact zeros.
    rewards = _f64([0.1, 0.1, 0.1, 1.0, 2.0, 0.7])
    advantages = group_advantages(rewards, _ids([4, 4, 4, 9, 9, 2]))
    assert advantages[:3].tolist() == [0.0, 0.0, 0.0]
    assert advantages[5].item() == 0.0  # a group of one
    torch.testing.assert_close(advantages[3:5], _f64([-0.5 / 0.5001, 0.5 / 0.5001]))
    as_float32 = group_advantages(rewards.float(), _ids([4, 4, 4, 9, 9, 2]), global_std=True)
    assert as_float32[:3].tolist() == [0.0, 0.0, 0.0]


def _loop_reference(
    rewards: torch.Tensor, ids: torch.Tensor, clip: float, eps: float
) -> torch.Tensor:
    """Slow per-group loop; constant groups give 0 like the vectorised version."""
    out = torch.empty_like(rewards)
    for column in range(rewards.shape[1]):
        for group in set(ids.tolist()):
            rows = [i for i in range(len(ids)) if ids[i].item() == group]
            values = [rewards[i, column].item() for i in rows]
            mean = sum(values) / len(values)
            std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
            for i, v in zip(rows, values):
                advantage = 0.0 if max(values) == min(values) else (v - mean) / (std + eps)
                out[i, column] = max(-clip, min(clip, advantage))
    return out


def test_float64_matches_loop_reference() -> None:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 6, (40,), generator=generator) * 7 + 3
    rewards = torch.randn(40, 3, generator=generator, dtype=torch.float64)
    rewards[:, 2] = rewards[:, 2].round()  # discrete column: ties and constant groups
    advantages = group_advantages(rewards, ids, adv_clip_max=1.5)
    assert advantages.dtype == torch.float64
    torch.testing.assert_close(advantages, _loop_reference(rewards, ids, 1.5, 1e-4))


def test_half_precision_is_computed_in_float32() -> None:
    rewards = torch.tensor([1.0, 3.0], dtype=torch.float16)
    advantages = group_advantages(rewards, _ids([0, 0]))
    assert advantages.dtype == torch.float32


@pytest.mark.parametrize(
    "rewards, ids",
    [
        (torch.zeros(2, 2, 2), _ids([0, 0])),  # 3-D rewards
        (torch.zeros(3), _ids([0, 0])),  # length mismatch
        (torch.zeros(2), torch.zeros(2)),  # float ids
        (torch.zeros(2, dtype=torch.int64), _ids([0, 0])),  # integer rewards
    ],
)
def test_invalid_inputs_raise(rewards: torch.Tensor, ids: torch.Tensor) -> None:
    with pytest.raises(ValueError):
        group_advantages(rewards, ids)


def test_broadcast_to_steps() -> None:
    advantages = _f64([1.5, -2.0])
    steps = broadcast_to_steps(advantages, 3)
    assert steps.shape == (2, 3)
    assert steps.tolist() == [[1.5, 1.5, 1.5], [-2.0, -2.0, -2.0]]
    steps[0, 0] = 9.0  # an independent tensor, not a view
    assert advantages[0].item() == 1.5
    with pytest.raises(ValueError):
        broadcast_to_steps(advantages, 0)
    with pytest.raises(ValueError):
        broadcast_to_steps(advantages.unsqueeze(1), 3)


# ----------------------------------------------------------------- dropping uninformative rows
def test_informative_rows_drop_a_tied_group_and_pad_to_the_micro_batch_count():
    from flow_grpo.algorithm.advantages import informative_rows

    rewards = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 5.0, 5.0, 5.0, 0.0, 1.0, 0.0, 1.0])  # group 1 tied
    group_ids = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2])
    advantages = broadcast_to_steps(group_advantages(rewards, group_ids), 3)
    assert (advantages[4:8] == 0).all()
    kept = informative_rows(advantages, 4, torch.Generator().manual_seed(0))
    assert kept.tolist() == [0, 1, 2, 3, 8, 9, 10, 11]  # 8 informative rows: a multiple of 4, nothing re-added
    kept = informative_rows(advantages, 3, torch.Generator().manual_seed(0))
    assert len(kept) == 9 and set(range(4)) | set(range(8, 12)) <= set(kept.tolist())
    assert len(set(kept.tolist()) & {4, 5, 6, 7}) == 1  # one tied row re-added to reach a multiple of 3


def test_informative_rows_keep_one_row_per_micro_batch_when_everything_is_tied():
    from flow_grpo.algorithm.advantages import informative_rows

    kept = informative_rows(torch.zeros(8, 2), 2, torch.Generator().manual_seed(1))
    assert len(kept) == 2 and len(set(kept.tolist())) == 2


def test_informative_rows_reject_rows_that_do_not_split():
    from flow_grpo.algorithm.advantages import informative_rows

    with pytest.raises(ValueError, match="micro-batches"):
        informative_rows(torch.ones(5, 2), 2, torch.Generator())
