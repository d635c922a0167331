"""The instability benchmark's baselines act as the peers' code does (bench/baselines.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from baselines import SkipStepAdamW, swift_nan_norm  # noqa: E402


class FakeAccelerator:
    def clip_grad_norm_(self, parameters, max_norm):
        return torch.nn.utils.clip_grad_norm_(parameters, max_norm)


def param_with_grad(bad: float) -> torch.nn.Parameter:
    p = torch.nn.Parameter(torch.ones(4))
    p.grad = torch.tensor([0.1, 0.2, bad, 0.3])
    return p


def test_swift_drops_gradients_on_a_nan_norm():
    accelerator, p = FakeAccelerator(), param_with_grad(float("nan"))
    swift_nan_norm(accelerator)
    assert accelerator.clip_grad_norm_([p], 0.3).isnan()
    assert p.grad is None


def test_swift_lets_an_inf_norm_through_and_clipping_makes_it_nan():
    accelerator, p = FakeAccelerator(), param_with_grad(float("inf"))
    swift_nan_norm(accelerator)
    assert accelerator.clip_grad_norm_([p], 0.3).isinf()
    assert p.grad is not None and p.grad.isnan().any()


def feed(optimizer: SkipStepAdamW, p, steps: int, loss: float = 1.0) -> None:
    for i in range(steps):
        p.grad = torch.full_like(p, 0.1)
        optimizer.latest_loss = torch.tensor(loss + 0.01 * (i % 3))
        optimizer.step()


@pytest.mark.parametrize("history", [0, 30])
def test_olmo_skip_step_writes_a_nan_gradient_into_the_weights(history):
    p = torch.nn.Parameter(torch.ones(4))
    optimizer = SkipStepAdamW([p], lr=1e-2, rolling_interval_length=32)  # active after 20 losses
    feed(optimizer, p, history)
    p.grad = torch.tensor([0.1, float("nan"), 0.1, 0.1])
    optimizer.latest_loss = torch.tensor(float("nan"))
    optimizer.step()
    # Before 20 losses the factor is 1; after, a NaN z-score gives 0, and NaN x 0 is still NaN.
    assert p.isnan().any()


def test_olmo_skip_step_holds_the_weights_on_a_finite_spike():
    p = torch.nn.Parameter(torch.ones(4))
    optimizer = SkipStepAdamW([p], lr=1e-2, rolling_interval_length=32)  # active after 20 losses
    feed(optimizer, p, 30)
    before = p.detach().clone()
    p.grad = torch.full_like(p, 0.1)
    optimizer.latest_loss = torch.tensor(50.0)
    optimizer.step()
    assert float(optimizer.step_skipped) == 1.0
    assert torch.equal(p.detach(), before)


def test_olmo_skip_step_is_adamw_when_it_proceeds():
    ours, theirs = torch.nn.Parameter(torch.ones(4)), torch.nn.Parameter(torch.ones(4))
    a, b = SkipStepAdamW([ours], lr=1e-2, weight_decay=0.0), torch.optim.AdamW([theirs], lr=1e-2, weight_decay=0.0)
    for i in range(3):
        ours.grad = theirs.grad = torch.tensor([0.1, -0.2, 0.3, 0.05]) * (i + 1)
        a.latest_loss = torch.tensor(1.0)
        a.step()
        b.step()
    torch.testing.assert_close(ours.detach(), theirs.detach())
