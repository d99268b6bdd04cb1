"""Which output units feed which inputs: a model's unit groups, declared by the model itself.

Structured DST and ``condense`` need to know that output channel ``j`` of ``conv2`` is read by
columns ``j*H*W .. (j+1)*H*W - 1`` of ``fc1`` (after flatten), or that GCN unit ``j`` is read
by two column blocks of a head after mean+max pooling. Tracing arbitrary models for this is
fragile (fused transformer kernels, PyG message passing), so a model declares it: a method
``unit_groups() -> list[UnitGroup]`` (duck-typed: strategies never imports tasks). A model
without it has no channel structure (every layer is then constant fan-in / unstructured).

A unit is usually one weight row. An attention head is a unit of ``rows_per_unit`` (head_dim)
rows in each of ``blocks`` stacked blocks (q, k, v of a fused ``in_proj_weight`` [3E, E]), read
by ``head_dim`` columns of ``out_proj`` (Michel et al. 2019, "Are Sixteen Heads Really Better
than One?": whole heads can be removed). ``unit_row_index`` gives every unit's rows.

A unit is DEAD when all its weight rows are fully masked. Its output is then exactly 0, and it can
be removed, provided its ``shift`` entries are 0 (bias, BatchNorm beta and running mean: the
structured engine keeps them at 0) and the activations between producer and consumers map 0
to 0 (ReLU, GELU, tanh, max/mean pooling, dropout) -- the declaring model's promise.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from strategies.sparse.masks import Mask

__all__ = [
    "Consumer",
    "UnitGroup",
    "consumer_columns",
    "dead_rows",
    "dead_units",
    "unit_groups",
    "unit_row_index",
    "zero_dead_shifts",
]


@dataclass(frozen=True)
class Consumer:
    """Input columns of ``weight`` (dim 1) that read the producer's units.

    layout "blocked": unit j -> columns offset + j*spatial + [0, spatial) (flattened C,H,W maps);
    "interleaved": unit j -> columns offset + p*units + j for p < spatial (flattened [N, units]).
    """

    weight: str
    offset: int = 0
    spatial: int = 1
    layout: str = "blocked"


@dataclass(frozen=True)
class UnitGroup:
    """Output units (dim 0) of ``producer`` with their per-unit tensors and their readers."""

    producer: str  # state_dict name of the weight whose dim 0 holds the units' rows
    shift: tuple[str, ...] = ()  # per-row tensors that must be 0 on dead units (bias, BN beta)
    scale: tuple[str, ...] = ()  # per-row tensors only sliced (BN gamma, running var)
    consumers: tuple[Consumer, ...] = field(default_factory=tuple)
    rows_per_unit: int = 1  # consecutive rows of one unit in every block (a head's head_dim)
    blocks: int = 1  # producer rows = ``blocks`` stacked blocks (fused q, k, v: 3)

    def units(self, rows: int) -> int:
        """Number of units of a producer with ``rows`` rows."""
        per = self.rows_per_unit * self.blocks
        if self.rows_per_unit < 1 or self.blocks < 1 or rows % per:
            raise ValueError(f"unit group {self.producer!r}: {rows} rows do not split into units")
        return rows // per


def unit_row_index(group: UnitGroup, rows: int) -> torch.Tensor:
    """[units, blocks * rows_per_unit] long: the producer rows of every unit, unit-major.

    Unit u owns rows ``b * rows / blocks + u * rows_per_unit + [0, rows_per_unit)`` of every
    block b; for a plain group (1 row per unit) this is ``arange(rows)[:, None]``.
    """
    units = group.units(rows)
    block = rows // group.blocks
    b = torch.arange(group.blocks).view(1, -1, 1) * block  # [1, blocks, 1]
    u = torch.arange(units).view(-1, 1, 1) * group.rows_per_unit  # [units, 1, 1]
    r = torch.arange(group.rows_per_unit).view(1, 1, -1)  # [1, 1, rows_per_unit]
    return (b + u + r).reshape(units, -1)


def unit_groups(model: nn.Module) -> list[UnitGroup]:
    """The model's declared groups (``model.unit_groups()``), or [] when it declares none."""
    fn = getattr(model, "unit_groups", None)
    if fn is None:
        return []
    groups = list(fn())
    state = model.state_dict()
    for g in groups:
        if g.producer not in state:
            raise ValueError(f"unit group producer {g.producer!r} is not in the state dict")
        rows = state[g.producer].shape[0]
        units = g.units(rows)
        for name in (*g.shift, *g.scale):
            if name not in state or state[name].shape[0] != rows:
                raise ValueError(f"unit group {g.producer!r}: {name!r} is not a [{rows}] tensor")
        for c in g.consumers:
            if c.weight not in state:
                raise ValueError(f"unit group {g.producer!r}: consumer {c.weight!r} not in state")
            cols = consumer_columns(c, units)
            if int(cols.max()) >= state[c.weight].shape[1]:
                raise ValueError(f"unit group {g.producer!r}: consumer {c.weight!r} too narrow")
    return groups


def consumer_columns(c: Consumer, units: int) -> torch.Tensor:
    """[units, spatial] column indices of ``c.weight`` read by each unit."""
    j = torch.arange(units).unsqueeze(1)  # [units, 1]
    p = torch.arange(c.spatial).unsqueeze(0)  # [1, spatial]
    if c.layout == "blocked":
        return c.offset + j * c.spatial + p
    if c.layout == "interleaved":
        return c.offset + p * units + j
    raise ValueError(f"unknown consumer layout {c.layout!r}")


def dead_units(mask: Mask, group: UnitGroup) -> torch.Tensor:
    """[units] bool: units whose producer rows are all fully masked ([0] if it is unmasked)."""
    m = mask.get(group.producer)
    if m is None:
        return torch.zeros(0, dtype=torch.bool)
    dead = ~m.reshape(m.shape[0], -1).any(1)  # [rows]
    if group.rows_per_unit == 1 and group.blocks == 1:
        return dead
    return dead.cpu()[unit_row_index(group, m.shape[0])].all(1)


def dead_rows(mask: Mask, group: UnitGroup) -> torch.Tensor:
    """[rows] bool: the producer rows of dead units ([0] if the producer is unmasked)."""
    dead = dead_units(mask, group)
    m = mask.get(group.producer)
    if m is None or (group.rows_per_unit == 1 and group.blocks == 1):
        return dead
    out = torch.zeros(m.shape[0], dtype=torch.bool)
    out[unit_row_index(group, m.shape[0])[dead.cpu()].reshape(-1)] = True
    return out


def zero_dead_shifts(model: nn.Module, mask: Mask, groups: list[UnitGroup]) -> None:
    """Set the shift tensors (bias, BN beta, BN running mean) of dead units to exactly 0."""
    tensors: dict[str, torch.Tensor] = dict(model.named_parameters(remove_duplicate=False))
    tensors.update(dict(model.named_buffers(remove_duplicate=False)))
    with torch.no_grad():
        for g in groups:
            dead = dead_rows(mask, g)
            if dead.numel() == 0 or not bool(dead.any()):
                continue
            for name in g.shift:
                t = tensors[name]
                t.masked_fill_(dead.to(t.device), 0.0)
