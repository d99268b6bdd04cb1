"""DSTConfig: the settings of one DST run and the rule names (kept apart from the engine)."""

from __future__ import annotations

from dataclasses import dataclass

from strategies.sparse.density import DENSITY_RULES
from strategies.sparse.saliency import INIT_METHODS

__all__ = ["RULES", "RULE_TABLE", "STRUCTURED_RULES", "DSTConfig"]

RULES = ("dense", "static", "set", "rigl", "gmp", "channel", "srigl", "nm")
# rule -> (drop rule, grow rule) names in prune_grow's registries, for the prune+grow rules.
RULE_TABLE: dict[str, tuple[str, str]] = {
    "set": ("magnitude", "random"),
    "rigl": ("magnitude", "gradient"),
    "channel": ("structured-magnitude", "structured-gradient"),
    "srigl": ("structured-magnitude", "structured-gradient"),
    "nm": ("structured-magnitude", "structured-gradient"),
}
STRUCTURED_RULES = ("channel", "srigl", "nm")


@dataclass(frozen=True)
class DSTConfig:
    """Settings of one DST run; ``validate`` raises ValueError naming the bad field."""

    rule: str = "rigl"  # "dense" | "static" | "set" | "rigl" | "gmp"
    density: float = 0.1  # target overall density of the sparsifiable tensors
    distribution: str = "erk"  # "erk" | "uniform"
    drop_fraction: float = 0.3  # RigL alpha
    update_interval: int = 100  # RigL delta T
    end_fraction: float = 0.75  # topology updates stop at end_fraction * total_steps
    gmp_start_fraction: float = 0.1
    gmp_end_fraction: float = 0.75
    erk_power_scale: float = 1.0  # ERK exponent: 1 = RigL's ERK, 0 = uniform
    init: str = "random"  # "random" | "magnitude" | "snip" | "grasp" (see saliency.py)
    exclude: tuple[str, ...] = ()  # fnmatch patterns of parameters/modules kept dense
    density_overrides: tuple[tuple[str, float], ...] = ()  # (pattern, fixed density)
    embeddings: bool = False  # also sparsify nn.Embedding tables

    def validate(self) -> None:
        """Raise ValueError naming the first invalid field."""
        if self.rule not in RULES:
            raise ValueError(f"DSTConfig.rule must be one of {RULES}, got {self.rule!r}")
        if not 0.0 < self.density <= 1.0:
            raise ValueError(f"DSTConfig.density must be in (0, 1], got {self.density}")
        if self.distribution not in DENSITY_RULES:
            raise ValueError(
                f"DSTConfig.distribution must be one of {sorted(DENSITY_RULES)}, "
                f"got {self.distribution!r}"
            )
        if not 0.0 <= self.drop_fraction <= 1.0:
            raise ValueError(f"DSTConfig.drop_fraction must be in [0, 1], got {self.drop_fraction}")
        if isinstance(self.update_interval, bool) or not isinstance(self.update_interval, int):
            raise ValueError(
                f"DSTConfig.update_interval must be an int, got {self.update_interval!r}"
            )
        if self.update_interval < 1:
            raise ValueError(f"DSTConfig.update_interval must be >= 1, got {self.update_interval}")
        if not 0.0 <= self.end_fraction <= 1.0:
            raise ValueError(f"DSTConfig.end_fraction must be in [0, 1], got {self.end_fraction}")
        if not 0.0 <= self.gmp_start_fraction < 1.0:
            raise ValueError(
                f"DSTConfig.gmp_start_fraction must be in [0, 1), got {self.gmp_start_fraction}"
            )
        if not 0.0 <= self.erk_power_scale <= 4.0:  # also rejects NaN
            raise ValueError(
                f"DSTConfig.erk_power_scale must be in [0, 4], got {self.erk_power_scale}"
            )
        if self.init not in INIT_METHODS:
            raise ValueError(f"DSTConfig.init must be one of {INIT_METHODS}, got {self.init!r}")
        for pattern, d in self.density_overrides:
            if not 0.0 < d <= 1.0:
                raise ValueError(f"DSTConfig.density_overrides: {pattern!r}={d} not in (0, 1]")
        if not self.gmp_start_fraction < self.gmp_end_fraction <= 1.0:
            raise ValueError(
                "DSTConfig.gmp_end_fraction must be in (gmp_start_fraction, 1], "
                f"got {self.gmp_end_fraction}"
            )
