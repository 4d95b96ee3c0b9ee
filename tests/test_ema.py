"""The EMA schedule of the published runs: decay min(0.9, (1+k)/(10+k)) at optimizer step k, every 8 steps."""

import torch

from flow_grpo.training.ema import ParameterEMA


def test_decay_and_update_steps_follow_the_formula_over_100_optimizer_steps():
    torch.manual_seed(0)
    param = torch.nn.Parameter(torch.randn(5))
    ema = ParameterEMA([param], decay=0.9, every=8)
    expected = param.detach().clone().float()
    updated_at = []
    for k in range(1, 101):  # k optimizer steps taken so far
        with torch.no_grad():
            param.add_(torch.randn(5))
        ema.step(k)
        if (k + 1) % 8 == 0:
            decay = min(0.9, (1 + k) / (10 + k))
            expected = decay * expected + (1 - decay) * param.detach().float()
            updated_at.append(k)
        torch.testing.assert_close(ema.shadow[0], expected, rtol=1e-6, atol=1e-6)
    assert updated_at == [7, 15, 23, 31, 39, 47, 55, 63, 71, 79, 87, 95]
    # The ramp counts optimizer steps, not EMA updates: by step 100 the decay has reached 0.9.
    assert ema.decay_at(100) == 0.9
    assert abs(ema.decay_at(7) - 8 / 17) < 1e-12


def test_swapped_in_restores_the_trained_weights():
    param = torch.nn.Parameter(torch.ones(3))
    ema = ParameterEMA([param], decay=0.9, every=1)
    with torch.no_grad():
        param.fill_(3.0)
    ema.step(1)  # decay min(0.9, 2/11)
    with ema.swapped_in():
        torch.testing.assert_close(param.detach(), torch.full((3,), 1 + 2 * (1 - 2 / 11)))
    torch.testing.assert_close(param.detach(), torch.full((3,), 3.0))
