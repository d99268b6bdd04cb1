"""Layer layout for densities and budgets: fused tensors as slices, overrides, initial masks.

A fused projection (``in_proj_weight`` [3E, E]) holds three layers (q, k, v). Treating it as
one tensor lets the density rule and the prune/grow budget move weights between q/k and v
(v's gradients are larger early in training, so q/k starve). Here every mask key with
``parts > 1`` is split into ``parts`` equal row slices, each a "unit" with its own density
(ERK sees three [E, E] layers) and its own active count. Units are named ``"name#i"``.

``plan_densities`` is the one place that turns (shapes, slices, overall density, rule, ERK
power scale, per-layer overrides) into per-unit densities; the client's controller and the
server's initial mask both use it, so the two always agree.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial

import torch

from strategies.sparse.density import erk_densities, layer_density_rule
from strategies.sparse.masks import Mask, MaskError, random_mask
from strategies.sparse.selection import apply_overrides, slice_rows

__all__ = ["join_units", "plan_densities", "planned_random_mask", "unit_rows", "unit_shapes"]

Shapes = Mapping[str, torch.Size | tuple[int, ...]]


def unit_rows(name: str, shape: torch.Size | tuple[int, ...], parts: int) -> list[slice]:
    """Row slices of one mask key's units (one full slice when ``parts`` is 1)."""
    if parts <= 1:
        return [slice(0, int(shape[0]))]
    return slice_rows(name, shape, parts)


def unit_shapes(shapes: Shapes, slices: Mapping[str, int]) -> dict[str, tuple[int, ...]]:
    """Shapes of the units: ``name`` itself, or ``name#i`` for each slice of a fused tensor."""
    out: dict[str, tuple[int, ...]] = {}
    for name, shape in shapes.items():
        parts = slices.get(name, 1)
        if parts <= 1:
            out[name] = tuple(shape)
            continue
        for i, rows in enumerate(unit_rows(name, shape, parts)):
            out[f"{name}#{i}"] = (rows.stop - rows.start, *tuple(shape)[1:])
    return out


def join_units(unit_mask: Mask, shapes: Shapes, slices: Mapping[str, int]) -> Mask:
    """Concatenate the units' masks back into one mask per key (row order kept)."""
    out: Mask = {}
    for name in shapes:
        parts = slices.get(name, 1)
        if parts <= 1:
            out[name] = unit_mask[name]
        else:
            out[name] = torch.cat([unit_mask[f"{name}#{i}"] for i in range(parts)], dim=0)
    return out


def plan_densities(
    shapes: Shapes,
    density: float,
    *,
    distribution: str = "erk",
    slices: Mapping[str, int] | None = None,
    erk_power_scale: float = 1.0,
    overrides: Mapping[str, float] | None = None,
) -> dict[str, float]:
    """Density of every unit so the active total is ``density`` of all entries.

    ``overrides``: fnmatch pattern -> fixed density for matching keys (their budget is taken
    first, the rest is spread by ``distribution``); ``erk_power_scale``: ERK's exponent
    (1 = RigL's ERK, 0 = uniform).
    """
    units = unit_shapes(shapes, slices or {})
    if density >= 1.0 and not overrides:
        return {u: 1.0 for u in units}
    fixed, rest = apply_overrides(units, density, overrides or {})
    free = {u: s for u, s in units.items() if u not in fixed}
    if distribution == "erk":
        rule = partial(erk_densities, power_scale=erk_power_scale)
        spread = rule(free, rest) if free else {}
    else:
        spread = layer_density_rule(distribution)(free, rest) if free else {}
    out = {**spread, **fixed}
    return {u: out[u] for u in units}


def planned_random_mask(
    shapes: Shapes,
    densities: Mapping[str, float],
    slices: Mapping[str, int] | None = None,
    generator: torch.Generator | None = None,
) -> Mask:
    """Random mask with exactly ``round(d * numel)`` (>= 1) active entries per unit."""
    units = unit_shapes(shapes, slices or {})
    missing = sorted(set(units) - set(densities))
    if missing:
        raise MaskError(f"no density planned for: {missing}")
    unit_mask = random_mask(units, {u: densities[u] for u in units}, generator)
    return join_units(unit_mask, shapes, slices or {})

