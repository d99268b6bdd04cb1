"""Schedules ``step -> fraction | None``: RigL cosine drop fraction, GMP cubic density.

``None`` means "no topology update at this step". Steps count completed optimizer steps
starting at 1 (the controller calls the schedule after its first ``optimizer.step()``).
"""

from __future__ import annotations

import math

__all__ = ["CosineDecay", "GMPSchedule"]


class CosineDecay:
    """RigL drop fraction (Evci et al. 2020): f(t) = alpha/2 * (1 + cos(pi * t / T_end)).

    Fires only when ``t % update_interval == 0`` and ``0 < t < end_step``; else ``None``.
    """

    def __init__(
        self, init_fraction: float = 0.3, update_interval: int = 100, end_step: int = 1000
    ) -> None:
        if not 0.0 <= init_fraction <= 1.0:
            raise ValueError(f"init_fraction must be in [0, 1], got {init_fraction}")
        if update_interval < 1:
            raise ValueError(f"update_interval must be >= 1, got {update_interval}")
        if end_step < 0:
            raise ValueError(f"end_step must be >= 0, got {end_step}")
        self.init_fraction = float(init_fraction)
        self.update_interval = int(update_interval)
        self.end_step = int(end_step)

    def fraction(self, step: int) -> float:
        """The decayed fraction at ``step`` regardless of the update interval."""
        if self.end_step == 0:
            return 0.0
        t = min(max(step, 0), self.end_step)
        return self.init_fraction / 2.0 * (1.0 + math.cos(math.pi * t / self.end_step))

    def __call__(self, step: int) -> float | None:
        if step <= 0 or step >= self.end_step or step % self.update_interval != 0:
            return None
        return self.fraction(step)


class GMPSchedule:
    """Gradual magnitude pruning (Zhu & Gupta 2017), expressed as target DENSITY.

    Sparsity s_t = s_f + (s_i - s_f) (1 - (t - t0) / (n dt))^3 for t0 <= t <= t0 + n dt; with
    d = 1 - s this is d_t = d_f + (d_i - d_f) (1 - (t - t0) / (t_end - t0))^3. Fires at
    t0, t0 + dt, ... and always at t_end (so the final density is reached); else ``None``.
    """

    def __init__(
        self,
        final_density: float,
        start_step: int,
        end_step: int,
        update_interval: int,
        init_density: float = 1.0,
    ) -> None:
        if not 0.0 < final_density <= 1.0:
            raise ValueError(f"final_density must be in (0, 1], got {final_density}")
        if not final_density <= init_density <= 1.0:
            raise ValueError(f"init_density must be in [final_density, 1], got {init_density}")
        if start_step < 0:
            raise ValueError(f"start_step must be >= 0, got {start_step}")
        if end_step <= start_step:
            raise ValueError(f"end_step ({end_step}) must be > start_step ({start_step})")
        if update_interval < 1:
            raise ValueError(f"update_interval must be >= 1, got {update_interval}")
        self.final_density = float(final_density)
        self.init_density = float(init_density)
        self.start_step = int(start_step)
        self.end_step = int(end_step)
        self.update_interval = int(update_interval)

    def density(self, step: int) -> float:
        """Scheduled density at any step (clamped to [start, end])."""
        t = min(max(step, self.start_step), self.end_step)
        progress = (t - self.start_step) / (self.end_step - self.start_step)
        return self.final_density + (self.init_density - self.final_density) * (1.0 - progress) ** 3

    def __call__(self, step: int) -> float | None:
        if step < self.start_step or step > self.end_step:
            return None
        if (step - self.start_step) % self.update_interval != 0 and step != self.end_step:
            return None
        return self.density(step)
