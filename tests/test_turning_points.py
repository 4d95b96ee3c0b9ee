"""Turning points, aggregation and balancing on hand-written reward sequences."""

from __future__ import annotations

import pytest
import torch

from flow_grpo.algorithm.turning_points import StepRewards, step_rewards, summarize


def _rewards(*rows: list[float]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def _bools(*rows: list[int]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.bool)


def _values(*rows: list[float]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


# ---------------------------------------------------------------------------------------------
# Basic quantities
# ---------------------------------------------------------------------------------------------


def test_incremental_and_aggregated_rewards() -> None:
    result = step_rewards(_rewards([0.0, 1.0, 3.0, 2.5]), balance=False)
    torch.testing.assert_close(result.incremental, _values([1.0, 2.0, -0.5]))
    torch.testing.assert_close(result.aggregated, _values([2.5, 1.5, -0.5]))
    # The incremental rewards telescope to the global trend.
    assert result.incremental.sum().item() == pytest.approx(2.5)


# ---------------------------------------------------------------------------------------------
# First-step rule
# ---------------------------------------------------------------------------------------------


def test_first_step_rule_on_and_off() -> None:
    # d = [1, 1, 1], R_W - R_1 = 2 > 0: the first step is a turning point; no c_j is negative.
    rewards = _rewards([0.0, 1.0, 2.0, 3.0])
    on = step_rewards(rewards, balance=False)
    assert torch.equal(on.candidates, _bools([1, 0, 0]))
    torch.testing.assert_close(on.rewards, _values([3.0, 1.0, 1.0]))

    off = step_rewards(rewards, first_step=False, balance=False)
    assert torch.equal(off.candidates, _bools([0, 0, 0]))
    torch.testing.assert_close(off.rewards, _values([1.0, 1.0, 1.0]))


def test_first_step_needs_the_rest_to_keep_direction() -> None:
    # d_0 = 1 but R_W - R_1 = -0.5: the first step's gain is not kept, not a turning point.
    result = step_rewards(_rewards([0.0, 1.0, 0.2, 0.5]), balance=False)
    assert not result.candidates[0, 0]
    # Negative direction kept to the end is a turning point too (g_0 = -3).
    result = step_rewards(_rewards([0.0, -1.0, -2.0, -3.0]), balance=False)
    assert torch.equal(result.candidates, _bools([1, 0, 0]))
    torch.testing.assert_close(result.rewards, _values([-3.0, -1.0, -1.0]))


# ---------------------------------------------------------------------------------------------
# Later steps and the consistency condition
# ---------------------------------------------------------------------------------------------


def test_dip_then_recovery_is_a_turning_point() -> None:
    # d = [-1, 3, 1], Delta = 3, c = [-1, 1, 1]; K_1 = sign(3) * sign(3 - 2) > 0.
    result = step_rewards(_rewards([0.0, -1.0, 2.0, 3.0]), balance=False)
    assert torch.equal(result.candidates, _bools([0, 1, 0]))
    torch.testing.assert_close(result.aggregated, _values([3.0, 4.0, 1.0]))
    # rho replaces d by g at the turning point (not added to it).
    torch.testing.assert_close(result.rewards, _values([-1.0, 4.0, 1.0]))


def test_consistency_condition_changes_the_answer() -> None:
    # d = [-1, 4, -1], Delta = 2, c = [-1, 1, -1]; K_1 = sign(4) * sign(2 - 3) < 0.
    rewards = _rewards([0.0, -1.0, 3.0, 2.0])
    strict = step_rewards(rewards, consistent=True, balance=False)
    assert torch.equal(strict.candidates, _bools([0, 0, 0]))
    torch.testing.assert_close(strict.rewards, _values([-1.0, 4.0, -1.0]))

    basic = step_rewards(rewards, consistent=False, balance=False)
    assert torch.equal(basic.candidates, _bools([0, 1, 0]))
    torch.testing.assert_close(basic.rewards, _values([-1.0, 3.0, -1.0]))


def test_last_window_step_never_a_turning_point_when_consistent() -> None:
    # d = [1, -2, 3], Delta = 2, c = [1, -1, 1]: step 2 flips the trend back, but K_2 uses
    # R_W - R_W = 0. Step 0 is a first-step turning point (R_W - R_1 = 1 > 0).
    rewards = _rewards([0.0, 1.0, -1.0, 2.0])
    strict = step_rewards(rewards, consistent=True, balance=False)
    assert torch.equal(strict.candidates, _bools([1, 0, 0]))
    basic = step_rewards(rewards, consistent=False, balance=False)
    assert torch.equal(basic.candidates, _bools([1, 0, 1]))

    generator = torch.Generator().manual_seed(3)
    random_rewards = torch.randn(64, 6, generator=generator, dtype=torch.float64)
    assert not step_rewards(random_rewards, balance=False).candidates[:, -1].any()


def test_first_step_rule_ignores_the_consistent_switch() -> None:
    rewards = _rewards([0.0, 1.0, 2.0, 3.0])
    basic = step_rewards(rewards, consistent=False, balance=False)
    assert torch.equal(basic.candidates, _bools([1, 0, 0]))


# ---------------------------------------------------------------------------------------------
# Zeros
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("consistent", [True, False])
@pytest.mark.parametrize(
    "row",
    [
        [0.0, 0.0, 1.0, 1.0],  # d = [0, 1, 0]: zero steps at both ends
        [0.0, -1.0, -1.0, 2.0],  # d = [-1, 0, 3]: a zero step between the dip and the recovery
        [0.0, 0.0, 0.0, 0.0],  # all equal
        [1.0, 1.0, 1.0, 2.0],  # first step zero (sign(d_0) = 0)
    ],
)
def test_zeros_never_create_turning_points(consistent: bool, row: list[float]) -> None:
    result = step_rewards(_rewards(row), consistent=consistent, balance=False)
    assert not result.candidates.any()
    torch.testing.assert_close(result.rewards, result.incremental)


@pytest.mark.parametrize("consistent", [True, False])
@pytest.mark.parametrize(
    "row",
    [
        [0.0, -1.0, 1.0, 0.0],
        [0.0, 1.0, 3.0, 0.0],
        [2.0, -1.0, 5.0, -3.0, 2.0],
    ],
)
def test_zero_trend_has_no_turning_points(consistent: bool, row: list[float]) -> None:
    # Delta = 0 makes every c_j = 0, and sign(d_0) * sign(R_W - R_1) = -sign(d_0)^2 <= 0.
    result = step_rewards(_rewards(row), consistent=consistent, balance=False)
    assert not result.candidates.any()


# ---------------------------------------------------------------------------------------------
# W = 1 and input validation
# ---------------------------------------------------------------------------------------------


def test_window_of_one_step() -> None:
    result = step_rewards(_rewards([0.0, 1.0], [2.0, 1.5], [1.0, 1.0]))
    assert result.rewards.shape == (3, 1)
    # R_W - R_1 = 0, so the first-step rule can never fire either.
    assert not result.candidates.any()
    torch.testing.assert_close(result.incremental, _values([1.0], [-0.5], [0.0]))
    torch.testing.assert_close(result.aggregated, result.incremental)
    torch.testing.assert_close(result.rewards, result.incremental)


@pytest.mark.parametrize(
    "bad",
    [
        torch.zeros(4),  # 1-D
        torch.zeros(2, 3, 4),  # 3-D
        torch.zeros(4, 1),  # W = 0
        torch.zeros(4, 3, dtype=torch.int64),  # not float
    ],
)
def test_invalid_input_raises(bad: torch.Tensor) -> None:
    with pytest.raises(ValueError):
        step_rewards(bad)


# ---------------------------------------------------------------------------------------------
# Balancing
# ---------------------------------------------------------------------------------------------


def test_balancing_keeps_largest_magnitudes_of_the_majority_sign() -> None:
    # W = 2. Rows 0-2 have a positive first-step turning point with g_0 = 2, 4, 3;
    # row 3 has a negative one with g_0 = -3. min(#pos, #neg) = 1: keep row 1 and row 3.
    rewards = _rewards(
        [0.0, 1.0, 2.0],
        [0.0, 1.0, 4.0],
        [0.0, 1.0, 3.0],
        [0.0, -1.0, -3.0],
    )
    result = step_rewards(rewards)
    assert torch.equal(result.candidates, _bools([1, 0], [1, 0], [1, 0], [1, 0]))
    assert torch.equal(result.turning_points, _bools([0, 0], [1, 0], [0, 0], [1, 0]))
    torch.testing.assert_close(
        result.rewards,
        _values([1.0, 1.0], [4.0, 3.0], [1.0, 2.0], [-3.0, -2.0]),
    )
    unbalanced = step_rewards(rewards, balance=False)
    assert torch.equal(unbalanced.turning_points, unbalanced.candidates)


def test_balancing_selects_by_g_not_by_trajectory_trend() -> None:
    # Row 0: turning points at j = 0 (g = 1.5) via the first-step rule, none later.
    # Row 1: dip then recovery, turning point at j = 1 with g = 5 although Delta = 3.
    # Row 2: a larger Delta (= 4) but g_0 = 4 < 5. Row 3 and 4: two negative turning points.
    rewards = _rewards(
        [0.0, 1.0, 1.2, 1.5],
        [0.0, -2.0, 1.0, 3.0],
        [0.0, 1.0, 2.0, 4.0],
        [0.0, -1.0, -1.5, -2.0],
        [0.0, -0.5, -0.7, -1.0],
    )
    result = step_rewards(rewards)
    assert torch.equal(
        result.candidates, _bools([1, 0, 0], [0, 1, 0], [1, 0, 0], [1, 0, 0], [1, 0, 0])
    )
    # Two negatives: keep the two largest positive |g|: 5 (row 1, j = 1) and 4 (row 2, j = 0).
    assert torch.equal(
        result.turning_points, _bools([0, 0, 0], [0, 1, 0], [1, 0, 0], [1, 0, 0], [1, 0, 0])
    )
    torch.testing.assert_close(result.rewards[1], _values([-2.0, 5.0, 2.0])[0])
    torch.testing.assert_close(result.rewards[0], _values([1.0, 0.2, 0.3])[0])


def test_balancing_ties_are_broken_by_row_major_order() -> None:
    # Positive g_0 = 3, 4, 3, 3 and two negatives: keep 4 (row 1) and the first 3 (row 0).
    rewards = _rewards(
        [0.0, 1.0, 3.0],
        [0.0, 1.0, 4.0],
        [0.0, 1.0, 3.0],
        [0.0, 1.0, 3.0],
        [0.0, -1.0, -2.0],
        [0.0, -1.0, -2.0],
    )
    result = step_rewards(rewards)
    assert result.turning_points[:, 0].tolist() == [True, True, False, False, True, True]


def test_balancing_with_more_negatives_keeps_largest_negative_magnitudes() -> None:
    rewards = _rewards(
        [0.0, -1.0, -2.0],  # g_0 = -2
        [0.0, -1.0, -5.0],  # g_0 = -5
        [0.0, 1.0, 1.5],  # g_0 = 1.5
        [0.0, -1.0, -3.0],  # g_0 = -3
    )
    result = step_rewards(rewards)
    assert result.turning_points[:, 0].tolist() == [False, True, True, False]


def test_one_sign_only_keeps_all() -> None:
    rewards = _rewards([0.0, 1.0, 2.0], [0.0, 1.0, 4.0], [0.0, 1.0, 3.0], [0.0, 1.0, 0.5])
    result = step_rewards(rewards)
    assert torch.equal(result.turning_points, result.candidates)
    assert result.turning_points[:, 0].tolist() == [True, True, True, False]


def test_no_turning_points_balancing_is_a_no_op() -> None:
    rewards = _rewards([0.0, 1.0, 0.5], [0.0, 0.0, 0.0])
    result = step_rewards(rewards)
    assert not result.turning_points.any()
    torch.testing.assert_close(result.rewards, result.incremental)


# Basic definition (consistent=False): R = [0, 2, 1, 2, 1] passes the sign tests at j = 2
# (c = [1, -1, 1, -1]) but g_2 = R_4 - R_2 = 0. K_2 < 0, so the strict definition rejects it anyway.
_ZERO_G_ROW = [0.0, 2.0, 1.0, 2.0, 1.0]
_POSITIVE_ROW = [0.0, 1.0, 2.0, 3.0, 4.0]  # first-step turning point, g_0 = 4
_NEGATIVE_ROW = [0.0, -1.0, -2.0, -3.0, -4.0]  # first-step turning point, g_0 = -4


@pytest.mark.parametrize("balance", [True, False])
@pytest.mark.parametrize(
    "others",
    [[], [_POSITIVE_ROW], [_NEGATIVE_ROW], [_POSITIVE_ROW, _NEGATIVE_ROW]],
    ids=["alone", "positive", "negative", "both_signs"],
)
def test_zero_g_step_is_not_a_turning_point(balance: bool, others: list[list[float]]) -> None:
    result = step_rewards(_rewards(_ZERO_G_ROW, *others), consistent=False, balance=balance)
    torch.testing.assert_close(result.incremental[0], _values([2.0, -1.0, 1.0, -1.0])[0])
    assert result.aggregated[0, 2].item() == 0.0
    # The sign tests of the basic definition pass at j = 2 ...
    c = torch.sign(result.incremental[0]) * torch.sign(result.aggregated[0, 0])
    assert c[1] < 0 and c[2] > 0
    # ... but g_2 = 0: neither a candidate nor a turning point, and rho_2 = d_2 = 1 (not g_2 = 0).
    assert not result.candidates[0].any() and not result.turning_points[0].any()
    torch.testing.assert_close(result.rewards[0], result.incremental[0])
    # The other rows' first-step turning points are unaffected (one per sign: balancing keeps both).
    assert result.turning_points[1:, 0].all() and result.turning_points.sum() == len(others)
    stats = summarize(result)
    assert stats["tp_pos_before"] + stats["tp_neg_before"] == len(others)
    assert stats["tp_rate"] == pytest.approx(len(others) / (4 * (1 + len(others))))

    strict = step_rewards(_rewards(_ZERO_G_ROW), consistent=True, balance=balance)
    assert not strict.candidates.any()


def test_float32_input_keeps_dtype() -> None:
    result = step_rewards(torch.tensor([[0.0, -1.0, 2.0, 3.0]]))
    assert result.rewards.dtype == torch.float32
    assert result.candidates.dtype == torch.bool
    assert result.turning_points[0].tolist() == [False, True, False]


# ---------------------------------------------------------------------------------------------
# summarize
# ---------------------------------------------------------------------------------------------


def test_summarize_values() -> None:
    rewards = _rewards(
        [0.0, 1.0, 2.0],
        [0.0, 1.0, 4.0],
        [0.0, 1.0, 3.0],
        [0.0, -1.0, -3.0],
    )
    stats = summarize(step_rewards(rewards))
    assert set(stats) == {
        "tp_rate/step_0",
        "tp_rate/step_1",
        "tp_rate",
        "tp_pos_before",
        "tp_neg_before",
        "tp_pos_after",
        "tp_neg_after",
        "mean_incremental",
        "mean_step_reward",
    }
    assert stats["tp_rate/step_0"] == pytest.approx(0.5)
    assert stats["tp_rate/step_1"] == pytest.approx(0.0)
    assert stats["tp_rate"] == pytest.approx(0.25)
    assert (stats["tp_pos_before"], stats["tp_neg_before"]) == (3.0, 1.0)
    assert (stats["tp_pos_after"], stats["tp_neg_after"]) == (1.0, 1.0)
    # d = [1,1], [1,3], [1,2], [-1,-2]; rho = [1,1], [4,3], [1,2], [-3,-2].
    assert stats["mean_incremental"] == pytest.approx(6.0 / 8.0)
    assert stats["mean_step_reward"] == pytest.approx(7.0 / 8.0)
    assert all(isinstance(value, float) for value in stats.values())


# ---------------------------------------------------------------------------------------------
# Property test against a slow reference
# ---------------------------------------------------------------------------------------------


def _sign(value: float) -> int:
    return (value > 0) - (value < 0)


def _reference(
    rows: list[list[float]], consistent: bool, first_step: bool, balance: bool
) -> tuple[list[list[bool]], list[list[bool]], list[list[float]]]:
    """Plain-Python transcription of docs/algorithm.md (TP-GRPO: step-wise rewards); returns (candidates, tps, rho)."""
    num_steps = len(rows[0]) - 1
    candidates = []
    for r in rows:
        final = r[num_steps]
        trend = _sign(final - r[0])
        row_candidates = []
        for j in range(num_steps):
            d_j = r[j + 1] - r[j]
            if j == 0:
                is_tp = first_step and _sign(d_j) * _sign(final - r[1]) > 0
            else:
                previous = _sign(r[j] - r[j - 1]) * trend
                current = _sign(d_j) * trend
                is_tp = previous < 0 and current > 0
                if consistent:
                    is_tp = is_tp and _sign(d_j) * _sign(final - r[j + 1]) > 0
            is_tp = is_tp and final - r[j] != 0  # g_j = 0 keeps rho_j = d_j
            row_candidates.append(is_tp)
        candidates.append(row_candidates)

    kept = [list(row) for row in candidates]
    if balance:
        positive, negative = [], []
        for b, r in enumerate(rows):
            for j in range(num_steps):
                if candidates[b][j]:
                    g = r[num_steps] - r[j]
                    flat = b * num_steps + j
                    if g > 0:
                        positive.append((-abs(g), flat))
                    elif g < 0:
                        negative.append((-abs(g), flat))
        if positive and negative:
            keep = min(len(positive), len(negative))
            survivors = {flat for _, flat in sorted(positive)[:keep]}
            survivors |= {flat for _, flat in sorted(negative)[:keep]}
            for b in range(len(rows)):
                for j in range(num_steps):
                    kept[b][j] = (b * num_steps + j) in survivors

    rho = []
    for b, r in enumerate(rows):
        rho.append(
            [
                (r[num_steps] - r[j]) if kept[b][j] else (r[j + 1] - r[j])
                for j in range(num_steps)
            ]
        )
    return candidates, kept, rho


def _zero_g_sign_passes(rows: list[list[float]], first_step: bool) -> bool:
    """True when some step passes the basic definition's sign tests with g_j = 0."""
    for r in rows:
        final, num_steps = r[-1], len(r) - 1
        trend = _sign(final - r[0])
        for j in range(num_steps):
            if final - r[j] != 0:
                continue
            d_j = r[j + 1] - r[j]
            if j == 0:
                passes = first_step and _sign(d_j) * _sign(final - r[1]) > 0
            else:
                passes = _sign(r[j] - r[j - 1]) * trend < 0 and _sign(d_j) * trend > 0
            if passes:
                return True
    return False


def _random_cases() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    cases = []
    for index in range(60):
        batch = int(torch.randint(1, 10, (1,), generator=generator))
        steps = int(torch.randint(1, 7, (1,), generator=generator))
        values = torch.randn(batch, steps + 1, generator=generator, dtype=torch.float64)
        if index % 3 == 1:
            values = (values * 2).round() / 2  # a few levels: ties and zeros
        elif index % 3 == 2:
            values = (values > 0).to(torch.float64)  # binary, like GenEval strict accuracy
        cases.append(values)
    cases.append(_rewards(_ZERO_G_ROW, _POSITIVE_ROW, _NEGATIVE_ROW))  # g_j = 0 under the basic definition
    return cases


@pytest.mark.parametrize("consistent", [True, False])
@pytest.mark.parametrize("first_step", [True, False])
@pytest.mark.parametrize("balance", [True, False])
def test_matches_slow_reference(consistent: bool, first_step: bool, balance: bool) -> None:
    checked_balancing = 0
    zero_g_sign_passes = 0
    for completed in _random_cases():
        result = step_rewards(
            completed, consistent=consistent, first_step=first_step, balance=balance
        )
        candidates, kept, rho = _reference(completed.tolist(), consistent, first_step, balance)
        assert isinstance(result, StepRewards)
        assert result.candidates.tolist() == candidates
        assert result.turning_points.tolist() == kept
        assert result.rewards.tolist() == rho
        if result.turning_points.sum() < result.candidates.sum():
            checked_balancing += 1
        zero_g_sign_passes += int(_zero_g_sign_passes(completed.tolist(), first_step))
    if balance and first_step:
        # The random cases must actually exercise the dropping branch of balancing.
        assert checked_balancing > 5
    if not consistent:
        # ... and steps that pass the basic sign tests with g_j = 0 (which must keep rho_j = d_j).
        assert zero_g_sign_passes >= 3
