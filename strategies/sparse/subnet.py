"""Sub-networks of a channel-structured model: which units a client trains, slice and scatter.

A sub-network is, per declared unit group (``units.UnitGroup``), the sorted indices of the
output units kept (a unit: a channel, a neuron, or an attention head's rows). Slicing a
full state dict by it gives the condensed model's tensors
(producer rows, per-unit shift/scale entries, consumer input columns), exactly the slicing
``condense`` does on a module; ``expand_state`` scatters condensed tensors back. Server and
client both derive the slicing from the same indices, so only the indices travel.

Capacity (clients of different width): a client of capacity c gets, per group,
``max(1, ceil(c * alive))`` of the consensus' alive units, those with the largest L2 norm
of the global producer row (the DST channel score, ``scores.channel_l2_score``), so each
client trains the most salient part of the consensus -- not a fixed prefix of the
channels as in HeteroFL (Diao et al. 2021) or FjORD (Horvath et al. 2021).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from strategies.sparse.condense import _set, _sync_sizes, _tensors  # one module surgery
from strategies.sparse.condensed_transformer import swap_encoders
from strategies.sparse.masks import Mask
from strategies.sparse.units import UnitGroup, consumer_columns, dead_units, unit_row_index

__all__ = [
    "Plan",
    "wire_masked_keys",
    "choose_units",
    "condense_state",
    "condense_mask",
    "coverage",
    "expand_state",
    "shrink_module",
    "slice_plan",
]

# name -> (kept rows of dim 0 or None, kept columns of dim 1 or None), long index tensors
Plan = dict[str, tuple[torch.Tensor | None, torch.Tensor | None]]


def choose_units(
    groups: Sequence[UnitGroup],
    mask: Mask,
    state: Mapping[str, torch.Tensor],
    capacity: float = 1.0,
) -> dict[str, torch.Tensor]:
    """{producer: sorted long indices of kept units}: the alive units of the consensus
    ``mask`` (rows with any active entry), cut to the ``ceil(capacity * alive)`` with the
    largest |global row| L2 norm (ties to the lower index). A group with no alive unit keeps
    unit 0 (zero-width layers are not supported by every op)."""
    if not 0.0 < capacity <= 1.0:
        raise ValueError(f"capacity must be in (0, 1], got {capacity}")
    out: dict[str, torch.Tensor] = {}
    for g in groups:
        w = state[g.producer].detach()
        rows = w.shape[0]
        index = unit_row_index(g, rows)  # [units, rows of a unit] (a head: its q/k/v rows)
        alive = (
            torch.ones(index.shape[0], dtype=torch.bool)
            if g.producer not in mask
            else ~dead_units(mask, g).cpu()
        )
        idx = alive.nonzero().squeeze(1)
        if idx.numel() == 0:
            out[g.producer] = torch.zeros(1, dtype=torch.long)
            continue
        n = max(1, math.ceil(capacity * idx.numel() - 1e-9))
        if n < idx.numel():
            row_sq = w.reshape(rows, -1).double().pow(2).sum(1).cpu()  # [rows]
            score = row_sq[index].sum(1).sqrt()[idx]  # L2 norm of each alive unit's rows
            top = torch.argsort(score, descending=True, stable=True)[:n]
            idx = idx[top].sort().values
        out[g.producer] = idx.to(torch.long)
    return out


def wire_masked_keys(kinds: Mapping[str, str], groups: Sequence[UnitGroup]) -> list[str]:
    """Masked keys whose condensed mask travels with a sub-network: all but the channel
    producers of one-row units (a kept channel is a whole active row: its mask is all
    ones). Multi-row units (attention heads) keep their masks on the wire."""
    plain = {g.producer for g in groups if (g.rows_per_unit, g.blocks) == (1, 1)}
    return [k for k, kind in kinds.items() if not (kind == "channel" and k in plain)]


def slice_plan(
    groups: Sequence[UnitGroup],
    shapes: Mapping[str, torch.Size | tuple[int, ...]],
    keep: Mapping[str, torch.Tensor],
) -> Plan:
    """Kept rows/columns per tensor name for the units ``keep`` (see module docstring); a
    unit of several rows (an attention head's q/k/v rows) keeps all of them."""
    rows: dict[str, torch.Tensor] = {}
    cols: dict[str, torch.Tensor] = {}
    for g in groups:
        n_rows = int(shapes[g.producer][0])
        index = unit_row_index(g, n_rows)  # [units, rows of a unit]
        units = index.shape[0]
        kept = torch.zeros(units, dtype=torch.bool)
        kept[keep[g.producer]] = True
        kept_rows = torch.zeros(n_rows, dtype=torch.bool)
        kept_rows[index[kept].reshape(-1)] = True
        for name in (g.producer, *g.shift, *g.scale):
            rows[name] = kept_rows
        for c in g.consumers:
            col = cols.setdefault(c.weight, torch.ones(int(shapes[c.weight][1]), dtype=torch.bool))
            col[consumer_columns(c, units)[~kept].reshape(-1)] = False
    plan: Plan = {}
    for name in sorted(set(rows) | set(cols)):
        kr, kc = rows.get(name), cols.get(name)
        plan[name] = (
            None if kr is None else kr.nonzero().squeeze(1),
            None if kc is None else kc.nonzero().squeeze(1),
        )
    return plan


def _take(t: torch.Tensor, rc: tuple[torch.Tensor | None, torch.Tensor | None]) -> torch.Tensor:
    r, c = rc
    out = t if r is None else t.index_select(0, r.to(t.device))
    return out if c is None else out.index_select(1, c.to(t.device))


def condense_state(state: Mapping[str, torch.Tensor], plan: Plan) -> dict[str, torch.Tensor]:
    """The condensed tensors: every tensor in ``plan`` sliced, the rest as they are."""
    return {k: (_take(v, plan[k]) if k in plan else v).clone() for k, v in state.items()}


def condense_mask(mask: Mask, plan: Plan) -> Mask:
    """The mask sliced like the weights."""
    return {k: _take(m, plan[k]) if k in plan else m.clone() for k, m in mask.items()}


def expand_state(
    small: Mapping[str, torch.Tensor],
    plan: Plan,
    shapes: Mapping[str, torch.Size | tuple[int, ...]],
    template: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Full-shape tensors: condensed entries scattered to their rows/columns, the rest from
    ``template`` (zeros where none). Inverse of ``condense_state`` on the kept entries."""
    out: dict[str, torch.Tensor] = {}
    for k, t in small.items():
        if k not in plan:
            out[k] = t.clone()
            continue
        base = None if template is None else template.get(k)
        full = (
            torch.zeros(tuple(shapes[k]), dtype=t.dtype)
            if base is None
            else base.detach().cpu().clone()
        )
        r, c = plan[k]
        rows = r if r is not None else torch.arange(full.shape[0])
        if c is None:
            full[rows] = t.cpu()
        else:
            full[rows.unsqueeze(1), c.unsqueeze(0)] = t.cpu()
        out[k] = full
    return out


def coverage(plan: Plan, shapes: Mapping[str, torch.Size | tuple[int, ...]]) -> Mask:
    """Bool full-shape tensors, True where the condensed model holds the entry (trained)."""
    out: Mask = {}
    for k, (r, c) in plan.items():
        shape = tuple(shapes[k])
        small = tuple(
            (len(r) if (i == 0 and r is not None) else len(c) if (i == 1 and c is not None) else s)
            for i, s in enumerate(shape)
        )
        ones = torch.ones(small, dtype=torch.bool)
        out[k] = expand_state({k: ones}, {k: (r, c)}, {k: shape})[k]
    return out


def shrink_module(model: nn.Module, plan: Plan) -> nn.Module:
    """Slice ``model``'s own tensors by ``plan`` in place (modules keep their classes, size
    attributes follow) and return it: the condensed network a client trains."""
    tensors = _tensors(model)
    for name, rc in plan.items():
        _set(model, name, _take(tensors[name].detach(), rc).clone())
    _sync_sizes(model)
    swap_encoders(model)  # fewer heads / MLP width: explicit-op encoder layers, same names
    return model
