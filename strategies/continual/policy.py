"""Regrowth policy: drift / task-boundary signals -> regrowth budget, beside the DST schedules.

A DST schedule (CosineDecay, GMP) is ``step -> fraction | None``; this policy is
``signal -> fraction | None``: one more producer of a regrowth budget. The budget is the
fraction of *active* weights to drop (lowest magnitude) and regrow (highest dense
gradient on the new data, RigL-style: Evci et al. 2020), so a shift in the stream buys the
sparse network fresh connections where the new loss gradient is largest, at constant
density. ``merge_budgets`` combines it with the schedule's fraction at a step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from strategies.continual.drift import DriftSignal


class Regrowable(Protocol):
    """What the policy drives: ``strategies.sparse.engine.DSTController`` satisfies it."""

    def regrow(
        self,
        fraction: float,
        grow_scores: dict[str, torch.Tensor] | None = None,
        *,
        protected: dict[str, torch.Tensor] | None = None,
    ) -> dict[str, int]: ...


@dataclass
class RegrowthPolicy:
    """Signal -> regrowth fraction.

    - task boundary: ``task_fraction`` (a new experience needs the most new capacity);
      it also resets the repeat counter;
    - drift: ``drift_fraction * decay**k`` where k counts drift signals since the last
      task boundary, so a client that keeps drifting within one task regrows less and
      less instead of churning its topology (k = 0 for the first);
    - no signal: ``base_fraction`` if > 0 else None (no extra event).
    Budgets below ``min_fraction`` are dropped (None): a tiny regrowth only costs a dense
    gradient pass.
    """

    base_fraction: float = 0.0
    drift_fraction: float = 0.2
    task_fraction: float = 0.3
    decay: float = 0.5
    min_fraction: float = 1e-3
    drifts_since_task: int = 0  # state: repeat counter for the decay

    def __post_init__(self) -> None:
        for name in ("base_fraction", "drift_fraction", "task_fraction"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {v}")
        if not 0.0 <= self.decay <= 1.0:
            raise ValueError(f"decay must be in [0, 1], got {self.decay}")
        if not 0.0 <= self.min_fraction <= 1.0:
            raise ValueError(f"min_fraction must be in [0, 1], got {self.min_fraction}")
        if self.drifts_since_task < 0:
            raise ValueError(f"drifts_since_task must be >= 0, got {self.drifts_since_task}")

    def budget(self, signal: DriftSignal | None) -> float | None:
        """Regrowth fraction for this signal (updates the repeat counter), or None."""
        if signal is None:
            fraction = self.base_fraction
        elif signal.kind == "task":
            self.drifts_since_task = 0
            fraction = self.task_fraction
        elif signal.kind == "drift":
            fraction = self.drift_fraction * self.decay**self.drifts_since_task
            self.drifts_since_task += 1
        else:
            raise ValueError(f"unknown signal kind {signal.kind!r} (expected 'drift' or 'task')")
        return fraction if fraction >= self.min_fraction and fraction > 0.0 else None

    def state_dict(self) -> dict[str, Any]:
        return {"drifts_since_task": self.drifts_since_task}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        n = int(state["drifts_since_task"])
        if n < 0:
            raise ValueError(f"drifts_since_task must be >= 0, got {n}")
        self.drifts_since_task = n


def merge_budgets(*budgets: float | None, cap: float = 1.0) -> float | None:
    """Combine producers at one step: the largest fraction, capped; None if none fired.

    Max (not sum) because schedule and trigger both ask "how much of the topology to
    refresh now"; refreshing twice in one step would drop just-grown weights.
    """
    fired = [b for b in budgets if b is not None]
    if not fired:
        return None
    return min(max(fired), cap)


def scheduled_budget(
    schedule: Callable[[int], float | None],
    step: int,
    signal: DriftSignal | None,
    policy: RegrowthPolicy,
) -> float | None:
    """Budget at ``step`` from a DST schedule and the policy's answer to ``signal``."""
    return merge_budgets(schedule(step), policy.budget(signal))


def gradient_grow_scores(
    model: nn.Module,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    names: Iterable[str],
) -> dict[str, torch.Tensor]:
    """Accumulated |dense gradient| of the loss on new data, per named parameter.

    RigL (Evci et al. 2020) grows the inactive connections with the largest gradient
    magnitude; pruned weights are exactly 0 but still receive a dense gradient, so one
    backward pass over a few batches of the *new* experience scores every candidate.
    Leaves ``.grad`` as it found it (zeroed). Returns {name: float tensor, param shape}.
    """
    params = dict(model.named_parameters())
    wanted = list(names)
    missing = [n for n in wanted if n not in params]
    if missing:
        raise KeyError(f"grow-score names not parameters of the model: {missing}")
    scores = {n: torch.zeros_like(params[n], dtype=torch.float32) for n in wanted}
    was_training = model.training
    model.train()
    seen = 0
    for x, y in batches:
        model.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        for n in wanted:
            g = params[n].grad
            if g is not None:
                scores[n] += g.detach().abs().float()
        seen += 1
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    if seen == 0:
        raise ValueError("gradient_grow_scores needs at least one batch")
    return scores


def apply_budget(
    controller: Regrowable,
    fraction: float | None,
    grow_scores: dict[str, torch.Tensor] | None = None,
    protected: dict[str, torch.Tensor] | None = None,
) -> dict[str, int]:
    """Run one on-demand regrowth event if a budget fired; {"dropped": 0, "grown": 0} if not.

    ``protected`` (e.g. ``ProtectionMask.forbidden_drop()``) marks weights the drop step
    must never pick: frozen weights of earlier experiences.
    """
    if fraction is None or fraction <= 0.0:
        return {"dropped": 0, "grown": 0}
    if protected is None:
        return controller.regrow(fraction, grow_scores)
    return controller.regrow(fraction, grow_scores, protected=protected)
