"""Which output units feed which inputs: a model's unit groups, declared by the model itself.

Structured DST and ``condense`` need to know that output channel ``j`` of ``conv2`` is read by
columns ``j*H*W .. (j+1)*H*W - 1`` of ``fc1`` (after flatten), or that GCN unit ``j`` is read
by two column blocks of a head after mean+max pooling. Tracing arbitrary models for this is
fragile (fused transformer kernels, PyG message passing), so a model declares it: a method
``unit_groups() -> list[UnitGroup]`` (duck-typed: strategies never imports tasks). A model
without it has no channel structure (every layer is then constant fan-in / unstructured).

A unit is DEAD when its weight row is fully masked. Its output is then exactly 0, and it can
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
    "dead_units",
    "unit_groups",
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

    producer: str  # state_dict name of the weight whose dim 0 indexes the units
    shift: tuple[
        str, ...
    ] = ()  # per-unit tensors that must be 0 on dead units (bias, BN beta/mean)
    scale: tuple[str, ...] = ()  # per-unit tensors only sliced (BN gamma, running var)
    consumers: tuple[Consumer, ...] = field(default_factory=tuple)


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
        units = state[g.producer].shape[0]
        for name in (*g.shift, *g.scale):
            if name not in state or state[name].shape[0] != units:
                raise ValueError(f"unit group {g.producer!r}: {name!r} is not a [{units}] tensor")
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
    """[units] bool: units whose producer row is fully masked (False everywhere if unmasked)."""
    m = mask.get(group.producer)
    if m is None:
        return torch.zeros(0, dtype=torch.bool)
    return ~m.reshape(m.shape[0], -1).any(1)


def zero_dead_shifts(model: nn.Module, mask: Mask, groups: list[UnitGroup]) -> None:
    """Set the shift tensors (bias, BN beta, BN running mean) of dead units to exactly 0."""
    tensors: dict[str, torch.Tensor] = dict(model.named_parameters(remove_duplicate=False))
    tensors.update(dict(model.named_buffers(remove_duplicate=False)))
    with torch.no_grad():
        for g in groups:
            dead = dead_units(mask, g)
            if dead.numel() == 0 or not bool(dead.any()):
                continue
            for name in g.shift:
                t = tensors[name]
                t.masked_fill_(dead.to(t.device), 0.0)
