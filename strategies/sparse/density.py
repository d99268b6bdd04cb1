"""Layer-density rules ``(shapes, density) -> {name: density}``: uniform and ERK (RigL).

A rule spreads an overall density over the sparsifiable tensors so that the active count
``sum_l d_l * n_l`` equals ``density * sum_l n_l``. New rules are one function added to
``DENSITY_RULES`` (e.g. a per-layer-fixed rule for structured sparsity).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch

Shapes = Mapping[str, torch.Size | tuple[int, ...]]
DensityRule = Callable[[Shapes, float], dict[str, float]]

__all__ = [
    "DENSITY_RULES",
    "DensityRule",
    "erk_densities",
    "layer_density_rule",
    "uniform_densities",
]


def _check_density(density: float) -> None:
    if not (0.0 < density <= 1.0):  # also rejects NaN
        raise ValueError(f"density must be in (0, 1], got {density}")


def uniform_densities(shapes: Shapes, density: float) -> dict[str, float]:
    """Every tensor gets the same density."""
    _check_density(density)
    return {name: float(density) for name in shapes}


def erk_densities(shapes: Shapes, density: float, power_scale: float = 1.0) -> dict[str, float]:
    """Erdos-Renyi-Kernel densities (Evci et al. 2020, RigL, Appendix/`sparse_utils`).

    Layer l with shape (n_out, n_in, k_1, ..., k_m) gets d_l = eps * (sum(shape) / prod(shape))
    ** power_scale, i.e. larger, squarer tensors get sparser. eps solves
    sum_l d_l n_l = density * N. If some d_l would exceed 1, the layers with the largest raw
    score are made dense, their parameters are taken out of the budget, and eps is solved again
    for the rest; this repeats until no layer overflows (RigL's ``is_eps_valid`` loop).
    """
    _check_density(density)
    if power_scale < 0 or math.isnan(power_scale):
        raise ValueError(f"power_scale must be >= 0, got {power_scale}")
    numels = {name: math.prod(shape) for name, shape in shapes.items()}
    for name, n in numels.items():
        if n == 0:
            raise ValueError(f"{name}: empty tensor of shape {tuple(shapes[name])}")
    if density == 1.0:
        return {name: 1.0 for name in shapes}
    raw = {name: (sum(shape) / numels[name]) ** power_scale for name, shape in shapes.items()}
    dense: set[str] = set()
    eps = 0.0
    while True:
        # Budget for the non-dense layers: density * N minus what the dense layers use up.
        rhs = 0.0
        divisor = 0.0
        for name, n in numels.items():
            if name in dense:
                rhs -= n * (1.0 - density)
            else:
                rhs += n * density
                divisor += raw[name] * n
        if divisor == 0.0:  # everything went dense (only possible when density ~ 1)
            break
        eps = rhs / divisor
        free = [name for name in numels if name not in dense]
        max_raw = max(raw[name] for name in free)
        if eps * max_raw > 1.0:
            dense.update(name for name in free if raw[name] == max_raw)
        else:
            break
    # min(1, .) only absorbs floating-point error: the loop guarantees eps * raw <= 1.
    out = {name: 1.0 if name in dense else min(1.0, eps * raw[name]) for name in shapes}
    assert all(0.0 < d <= 1.0 for d in out.values()), out
    return out


DENSITY_RULES: dict[str, DensityRule] = {
    "uniform": uniform_densities,
    "erk": erk_densities,
}


def layer_density_rule(name: str) -> DensityRule:
    """Look a density rule up by name ("uniform" | "erk")."""
    try:
        return DENSITY_RULES[name]
    except KeyError:
        raise ValueError(
            f"unknown layer density rule {name!r}; known: {sorted(DENSITY_RULES)}"
        ) from None
