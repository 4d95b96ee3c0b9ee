"""Clipped GRPO loss, KL to the reference, and diagnostics."""

from __future__ import annotations

import math

import pytest
import torch

from flow_grpo.algorithm.losses import LossOutput, grpo_loss, kl_to_reference


def _f64(values: list) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def test_ratio_one_gives_minus_mean_advantage_and_its_gradient() -> None:
    log_prob = _f64([-1.0, -2.0, 0.5, 3.0]).requires_grad_()
    old_log_prob = log_prob.detach().clone()
    advantages = _f64([1.0, -2.0, 0.5, 4.0])
    out = grpo_loss(log_prob, old_log_prob, advantages, clip_range=1e-5)
    assert isinstance(out, LossOutput)
    assert out.policy_loss.item() == pytest.approx(-0.875)
    assert out.loss.item() == pytest.approx(-0.875)
    assert out.kl.item() == 0.0
    out.loss.backward()
    # d/d log_prob_i of mean(-A * exp(log_prob - old)) at ratio 1 is -A_i / B.
    torch.testing.assert_close(log_prob.grad, -advantages / 4)
    assert out.ratio_mean.item() == pytest.approx(1.0)
    assert out.approx_kl.item() == 0.0
    assert out.clip_fraction.item() == 0.0


def test_raising_log_prob_of_positive_advantage_lowers_the_loss() -> None:
    old = _f64([0.0, 0.0])
    advantages = _f64([2.0, -1.0])
    base = grpo_loss(old.clone(), old, advantages, clip_range=0.2).loss
    up = grpo_loss(_f64([0.05, 0.0]), old, advantages, clip_range=0.2).loss
    assert up < base
    # And for a negative advantage, raising its log-prob raises the loss.
    up_negative = grpo_loss(_f64([0.0, 0.05]), old, advantages, clip_range=0.2).loss
    assert up_negative > base


@pytest.mark.parametrize(
    "advantage, log_ratio, has_gradient",
    [
        (1.0, 0.5, False),  # A > 0, ratio above 1 + eps: clipped branch is the max, constant
        (1.0, -0.5, True),  # A > 0, ratio below 1 - eps: the unclipped branch is the max
        (-1.0, 0.5, True),  # A < 0, ratio above 1 + eps: unclipped branch is the max
        (-1.0, -0.5, False),  # A < 0, ratio below 1 - eps: clipped branch, constant
        (1.0, 0.05, True),  # inside the range: both branches agree
    ],
)
def test_clipping_gradient_follows_the_max_form(
    advantage: float, log_ratio: float, has_gradient: bool
) -> None:
    clip_range = 0.2
    log_prob = _f64([log_ratio]).requires_grad_()
    out = grpo_loss(log_prob, _f64([0.0]), _f64([advantage]), clip_range=clip_range)
    out.loss.backward()
    ratio = math.exp(log_ratio)
    clipped_ratio = min(max(ratio, 1 - clip_range), 1 + clip_range)
    expected = max(-advantage * ratio, -advantage * clipped_ratio)
    assert out.policy_loss.item() == pytest.approx(expected)
    if has_gradient:
        assert log_prob.grad.item() == pytest.approx(-advantage * ratio)
    else:
        assert log_prob.grad.item() == 0.0


def test_diagnostics_on_a_hand_example() -> None:
    log_ratio = [0.0, 0.1, -0.3, 0.02]
    old = _f64([-1.0, -1.0, -1.0, -1.0])
    log_prob = old + _f64(log_ratio)
    out = grpo_loss(log_prob, old, _f64([1.0, 1.0, 1.0, 1.0]), clip_range=0.05)
    ratios = [math.exp(x) for x in log_ratio]
    assert out.approx_kl.item() == pytest.approx(0.5 * sum(x * x for x in log_ratio) / 4)
    assert out.ratio_mean.item() == pytest.approx(sum(ratios) / 4)
    # |ratio - 1| > 0.05 for log ratios 0.1 and -0.3 only.
    assert out.clip_fraction.item() == pytest.approx(0.5)
    expected = [max(-r, -min(max(r, 0.95), 1.05)) for r in ratios]
    assert out.policy_loss.item() == pytest.approx(sum(expected) / 4)
    for value in (out.approx_kl, out.clip_fraction, out.ratio_mean):
        assert value.dim() == 0 and not value.requires_grad


def test_diagnostics_are_detached_when_log_prob_requires_grad() -> None:
    log_prob = _f64([0.1, -0.1]).requires_grad_()
    out = grpo_loss(log_prob, _f64([0.0, 0.0]), _f64([1.0, -1.0]), clip_range=0.2)
    assert out.loss.requires_grad
    assert not out.approx_kl.requires_grad
    assert not out.clip_fraction.requires_grad
    assert not out.ratio_mean.requires_grad


def test_kl_zero_when_policy_equals_reference() -> None:
    mean = torch.randn(3, 4, 2, 2, generator=torch.Generator().manual_seed(0))
    kl = kl_to_reference(mean, mean.clone(), torch.tensor([0.1, 0.2, 0.3]))
    assert kl.shape == (3,)
    assert kl.tolist() == [0.0, 0.0, 0.0]


def test_kl_matches_hand_formula() -> None:
    mean = _f64([[[1.0, 2.0], [3.0, 4.0]], [[0.0, 0.0], [0.0, 0.0]]])
    reference = _f64([[[1.0, 0.0], [3.0, 5.0]], [[1.0, -1.0], [2.0, 0.0]]])
    std = _f64([0.5, 2.0])
    kl = kl_to_reference(mean, reference, std)
    # Row 0: mean sq diff (0 + 4 + 0 + 1) / 4 = 1.25, / (2 * 0.25) = 2.5.
    # Row 1: (1 + 1 + 4 + 0) / 4 = 1.5, / (2 * 4) = 0.1875.
    torch.testing.assert_close(kl, _f64([2.5, 0.1875]))


def test_kl_gradient_flows_to_mean_only() -> None:
    mean = _f64([[1.0, 2.0]]).requires_grad_()
    reference = _f64([[0.0, 0.0]]).requires_grad_()
    kl = kl_to_reference(mean, reference, _f64([1.0]))
    kl.sum().backward()
    # d/dmean of mean((m - r)^2) / 2 = (m - r) / 2.
    torch.testing.assert_close(mean.grad, _f64([[0.5, 1.0]]))
    assert reference.grad is None


def test_loss_adds_beta_times_kl() -> None:
    log_prob = _f64([0.0, 0.0])
    advantages = _f64([1.0, 3.0])
    mean = _f64([[1.0, 1.0], [0.0, 2.0]])
    reference = _f64([[0.0, 1.0], [0.0, 0.0]])
    std = _f64([1.0, 1.0])
    out = grpo_loss(
        log_prob, log_prob, advantages, clip_range=1e-5, beta=0.1,
        mean=mean, reference_mean=reference, std=std,
    )
    # KL rows: 0.5 / 2 = 0.25 and 2 / 2 = 1.0 -> mean 0.625.
    assert out.kl.item() == pytest.approx(0.625)
    assert out.policy_loss.item() == pytest.approx(-2.0)
    assert out.loss.item() == pytest.approx(-2.0 + 0.1 * 0.625)
    # beta = 0: the KL term is neither computed nor added.
    no_kl = grpo_loss(
        log_prob, log_prob, advantages, clip_range=1e-5, beta=0.0,
        mean=mean, reference_mean=reference, std=std,
    )
    assert no_kl.kl.item() == 0.0
    assert no_kl.loss.item() == pytest.approx(-2.0)


@pytest.mark.parametrize("missing", ["mean", "reference_mean", "std"])
def test_beta_without_reference_raises(missing: str) -> None:
    kwargs = {
        "mean": torch.zeros(2, 3),
        "reference_mean": torch.zeros(2, 3),
        "std": torch.ones(2),
    }
    kwargs[missing] = None
    with pytest.raises(ValueError):
        grpo_loss(torch.zeros(2), torch.zeros(2), torch.ones(2), clip_range=0.1, beta=0.1, **kwargs)


def test_shape_mismatch_raises() -> None:
    with pytest.raises(ValueError):
        grpo_loss(torch.zeros(2), torch.zeros(3), torch.zeros(2), clip_range=0.1)
    with pytest.raises(ValueError):
        kl_to_reference(torch.zeros(2, 3), torch.zeros(2, 4), torch.ones(2))
    with pytest.raises(ValueError):
        kl_to_reference(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(3))
