"""Regrowth policy: signal -> budget, decay of repeated drifts, merging with schedules."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from strategies.continual.drift import DriftSignal
from strategies.continual.policy import (
    RegrowthPolicy,
    apply_budget,
    gradient_grow_scores,
    merge_budgets,
    scheduled_budget,
)
from strategies.continual.protection import ProtectionMask
from strategies.sparse.engine import DSTConfig, DSTController

DRIFT = DriftSignal(kind="drift", step=10, source="adwin")
TASK = DriftSignal(kind="task", step=20, source="boundary", task_id=1)


def test_budgets_for_each_signal_and_decay() -> None:
    p = RegrowthPolicy(base_fraction=0.0, drift_fraction=0.2, task_fraction=0.3, decay=0.5)
    assert p.budget(None) is None  # base 0 -> no extra event
    assert p.budget(DRIFT) == pytest.approx(0.2)  # 0.2 * 0.5**0
    assert p.budget(DRIFT) == pytest.approx(0.1)  # 0.2 * 0.5**1
    assert p.budget(DRIFT) == pytest.approx(0.05)  # 0.2 * 0.5**2
    assert p.budget(TASK) == pytest.approx(0.3)  # boundary resets the repeat counter
    assert p.budget(DRIFT) == pytest.approx(0.2)


def test_min_fraction_and_base_fraction() -> None:
    p = RegrowthPolicy(base_fraction=0.05, drift_fraction=0.2, decay=0.1, min_fraction=0.01)
    assert p.budget(None) == pytest.approx(0.05)
    assert p.budget(DRIFT) == pytest.approx(0.2)
    assert p.budget(DRIFT) == pytest.approx(0.02)
    assert p.budget(DRIFT) is None  # 0.002 < min_fraction


def test_state_roundtrip_and_validation() -> None:
    p = RegrowthPolicy()
    p.budget(DRIFT)
    p.budget(DRIFT)
    q = RegrowthPolicy()
    q.load_state_dict(p.state_dict())
    assert q.budget(DRIFT) == p.budget(DRIFT) == pytest.approx(0.05)
    with pytest.raises(ValueError, match="drift_fraction"):
        RegrowthPolicy(drift_fraction=1.5)
    with pytest.raises(ValueError, match="decay"):
        RegrowthPolicy(decay=-0.1)
    with pytest.raises(ValueError, match="kind"):
        RegrowthPolicy().budget(DriftSignal(kind="other", step=1, source="x"))


def test_merge_with_schedule() -> None:
    assert merge_budgets(None, None) is None
    assert merge_budgets(0.1, None, 0.3) == 0.3
    assert merge_budgets(0.9, 0.8, cap=0.5) == 0.5

    def schedule(step: int) -> float | None:  # fires only every 100 steps
        return 0.1 if step % 100 == 0 else None

    p = RegrowthPolicy()
    assert scheduled_budget(schedule, 50, None, p) is None
    assert scheduled_budget(schedule, 100, None, p) == 0.1
    assert scheduled_budget(schedule, 150, TASK, p) == pytest.approx(0.3)


class FakeController:
    def __init__(self) -> None:
        self.calls: list[tuple[float, dict[str, torch.Tensor] | None]] = []

    def regrow(
        self,
        fraction: float,
        grow_scores: dict[str, torch.Tensor] | None = None,
        *,
        protected: dict[str, torch.Tensor] | None = None,
    ) -> dict[str, int]:
        self.calls.append((fraction, grow_scores))
        return {"dropped": 3, "grown": 3}


def test_apply_budget_calls_regrow_only_when_fired() -> None:
    c = FakeController()
    assert apply_budget(c, None) == {"dropped": 0, "grown": 0}
    assert apply_budget(c, 0.25) == {"dropped": 3, "grown": 3}
    assert [f for f, _ in c.calls] == [0.25]


def test_gradient_grow_scores_are_dense_abs_gradients() -> None:
    lin = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[0.0, 0.0]]))  # fully pruned: still gets a gradient
    x = torch.tensor([[1.0, -2.0]])
    y = torch.tensor([[1.0]])

    def mse(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return ((out - target) ** 2).sum()

    # d/dw (w.x - 1)^2 at w = 0: 2 * (0 - 1) * x = [-2, 4]; |.| summed over 2 batches = [4, 8]
    scores = gradient_grow_scores(lin, mse, [(x, y), (x, y)], ["weight"])
    assert torch.equal(scores["weight"], torch.tensor([[4.0, 8.0]]))
    assert lin.weight.grad is None
    with pytest.raises(KeyError, match="nope"):
        gradient_grow_scores(lin, mse, [(x, y)], ["nope"])


def test_budget_drives_the_real_dst_controller() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    config = DSTConfig(rule="rigl", density=0.5, distribution="uniform")
    controller = DSTController(model, opt, config, total_steps=100)
    active = {n: int(m.sum()) for n, m in controller.mask.items()}
    x, y = torch.randn(16, 8), torch.randint(0, 3, (16,))
    scores = gradient_grow_scores(
        model, nn.functional.cross_entropy, [(x, y)], list(controller.mask)
    )
    policy = RegrowthPolicy(task_fraction=0.3)
    # Freeze the top half of the active weights (PackNet-style) before the regrowth.
    weights = dict(model.state_dict())
    protection = ProtectionMask.for_mask(controller.mask)
    protection.consolidate(weights, controller.mask, fraction=0.5)
    frozen = protection.forbidden_drop()
    out = apply_budget(controller, policy.budget(TASK), scores, protected=frozen)
    assert out["dropped"] == out["grown"] > 0
    assert {n: int(m.sum()) for n, m in controller.mask.items()} == active  # density kept
    for n, f in frozen.items():  # no frozen weight was dropped
        assert bool(controller.mask[n][f].all()), n
