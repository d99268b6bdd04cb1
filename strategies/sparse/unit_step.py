"""DSTController's per-unit step: prune/grow one unit, unit-major views, optimizer-state reset."""

from __future__ import annotations

import dataclasses
import math

import torch

from strategies.sparse.masks import Mask, MaskError
from strategies.sparse.prune_grow import (
    DropRule,
    GrowRule,
    LayerState,
    check_prune_grow,
    drop_lowest,
)
from strategies.sparse.scores import magnitude_score
from strategies.sparse.units import UnitGroup, unit_row_index

__all__ = ["UnitViews", "check_regrow_inputs", "prune_grow_unit", "reset_optimizer_state"]


class UnitViews:
    """[rows, ...] <-> [units, rows_per_unit * blocks * fan_in] for multi-row channel units
    (attention heads: head_dim rows in each of q, k, v), so channel rules see one row per unit.
    Tensors without multi-row units pass through unchanged."""

    def __init__(
        self, groups: list[UnitGroup], shapes: dict[str, torch.Size], structure: dict[str, str]
    ) -> None:
        self.shapes = shapes
        self.groups = {g.producer: g for g in groups}
        self.perm: dict[str, torch.Tensor] = {
            g.producer: unit_row_index(g, shapes[g.producer][0]).reshape(-1)
            for g in groups
            if (g.rows_per_unit, g.blocks) != (1, 1) and structure[g.producer] == "channel"
        }

    def view(self, name: str, t: torch.Tensor) -> torch.Tensor:
        perm = self.perm.get(name)
        if perm is None:
            return t
        return t[perm.to(t.device)].reshape(self.shape(name))

    def unview(self, name: str, t: torch.Tensor) -> torch.Tensor:
        perm = self.perm.get(name)
        if perm is None:
            return t
        out = torch.empty(self.shapes[name], dtype=t.dtype, device=t.device)
        out[perm.to(t.device)] = t.reshape(self.shapes[name])
        return out

    def shape(self, name: str) -> tuple[int, ...]:
        shape = tuple(self.shapes[name])
        if name not in self.perm:
            return shape
        units = self.groups[name].units(shape[0])
        return (units, math.prod(shape) // units)


def prune_grow_unit(  # noqa: PLR0913 - one unit's state and its two rules
    layer: LayerState,
    fraction: float,
    protected: torch.Tensor | None,
    drop_rule: DropRule,
    grow_rule: GrowRule,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(dropped, grown) of one unit (a layer, or one q/k/v slice), or None if nothing moves.

    n_drop = round(f * active) (RigL), capped at the droppable and the inactive counts so the
    grow set (entries inactive BEFORE the drop) exists; the unit keeps its active count.
    ``protected`` entries are never dropped.
    """
    m, w, pr = layer.mask, layer.weight, protected
    active = int(m.sum())
    droppable = active if pr is None else int((m & ~pr).sum())
    k = min(round(fraction * active), droppable, m.numel() - active)
    if k <= 0:
        return None
    if pr is not None and layer.structure != "none":
        # Protected weights score +inf |w| (and their units +inf norm): never dropped.
        w_inf = w.masked_fill(pr, float("inf"))
        dropped = drop_rule(dataclasses.replace(layer, weight=w_inf), k)
    elif pr is not None:
        # Protected weights get +inf drop score, so they are never the lowest.
        dropped = drop_lowest(m, magnitude_score(w).masked_fill(pr, float("inf")), k)
    else:
        dropped = drop_rule(layer, k)
    after = m & ~dropped
    k = int(dropped.sum())  # structured drops round to whole units / rows
    if k == 0:
        return None
    grown = grow_rule(layer, after, dropped, k)
    check_prune_grow(m, dropped, grown, after | grown, layer.name)
    return dropped, grown


def check_regrow_inputs(
    shapes: dict[str, torch.Size], scores: dict[str, torch.Tensor], protected: Mask | None
) -> None:
    """Grow scores and protected masks name masked tensors and have their shapes."""
    for n, s in scores.items():
        if n not in shapes:
            raise MaskError(f"grow_scores key {n!r} is not a masked tensor")
        if s.shape != shapes[n]:
            raise MaskError(f"{n}: grow score shape {tuple(s.shape)} != {tuple(shapes[n])}")
    if protected is not None:
        for n, m in protected.items():
            if n not in shapes or m.shape != shapes[n]:
                raise MaskError(f"protected key {n!r} missing from mask or wrong shape")


def reset_optimizer_state(
    optimizer: torch.optim.Optimizer, p: torch.nn.Parameter, positions: torch.Tensor
) -> None:
    """Zero every per-parameter state tensor of ``p`` at ``positions``.

    SGD momentum_buffer, Adam/AdamW exp_avg, exp_avg_sq, max_exp_avg_sq, RMSprop square_avg,
    ...: a regrown weight starts fresh. Scalar state (Adam's ``step``) is per tensor and
    cannot be reset per entry, as in RigL.
    """
    state = optimizer.state.get(p)
    if not state or not bool(positions.any()):
        return
    with torch.no_grad():
        for v in state.values():
            if isinstance(v, torch.Tensor) and v.shape == p.shape:
                v.masked_fill_(positions.to(v.device), 0)
