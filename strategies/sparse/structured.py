"""Structured masks: whole output units (channels/neurons), constant fan-in rows, N:M groups.

Every weight is viewed as ``[units, fan_in]`` (dim 0 = output neurons of a Linear, output
channels of a Conv; the rest flattened). Three structures, all selections over scores from
``scores`` (selection never computes a score):

- channel: a unit is fully active or fully inactive; drop the ``r`` active units with the
  lowest channel score (row L2 norm), grow the ``r`` inactive ones with the highest row
  gradient norm. Condenses to a smaller dense layer (and narrower inputs of the next one).
- constant fan-in (SRigL, Lasby et al. 2023): every active unit has the same number ``k`` of
  active inputs; drop/grow happen per row, the same count in every active row, so ``k``
  stays constant. Condenses to ``[units, k]`` values + ``[units, k]`` indices.
- N:M (Mishra et al. 2021, "2:4"): exactly ``n`` active entries in every group of ``m``
  consecutive inputs; drop one entry in the groups with the weakest active entry and regrow in
  the same groups. Its fast kernels are GPU-only (sparse tensor cores); on CPU it is a mask.

Grow rules grow, per segment (row or group), exactly as many entries as the drop removed in
it (``forbidden`` is the drop set), so the active count per row/group is kept, dropped and
grown sets are disjoint, and ``prune_grow.check_prune_grow`` holds.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from strategies.sparse.masks import Mask, MaskError

__all__ = [
    "NM",
    "ablate_units",
    "channel_drop",
    "channel_grow",
    "check_structure",
    "fanin_drop",
    "from_units",
    "grow_per_segment",
    "nm_drop",
    "row_counts",
    "structured_init",
    "structured_vote",
    "to_units",
]

NM = (2, 4)  # default N:M pattern


def _rows(t: torch.Tensor) -> torch.Tensor:
    """[units, fan_in] view of a weight (a 1-D tensor is one row)."""
    return t.reshape(t.shape[0], -1) if t.dim() > 1 else t.reshape(1, -1)


def row_counts(mask: torch.Tensor) -> torch.Tensor:
    """Active entries per output unit: [units] int64."""
    return _rows(mask).sum(1)


def _unit_score(score: torch.Tensor, units: int) -> torch.Tensor:
    # A per-unit [units] score is used as is; a full-shape score is reduced by its row L2 norm.
    s = score.detach().float()
    if s.dim() == 1 and s.numel() == units:
        return torch.nan_to_num(s, nan=-math.inf)
    return torch.nan_to_num(_rows(s).norm(dim=1), nan=-math.inf)


def channel_drop(mask: torch.Tensor, score: torch.Tensor, n: int) -> torch.Tensor:
    """Drop set of ``r = round(n / fan_in)`` whole active units with the lowest ``score``.

    ``score`` is [units] (e.g. ``scores.channel_l2_score``) or full-shape (reduced by row L2
    norm). ``r`` is capped so at least one unit stays active and the grow set exists.
    """
    m = _rows(mask)
    units, fan_in = m.shape
    active = m.all(1)  # [units] fully active units
    inactive = ~m.any(1)
    r = min(round(n / fan_in), int(active.sum()) - 1, int(inactive.sum()))
    out = torch.zeros_like(m)
    if r <= 0:
        return out.view(mask.shape)
    s = _unit_score(score, units).masked_fill(~active, math.inf)
    out[torch.argsort(s, stable=True)[:r]] = True
    return out.view(mask.shape)


def channel_grow(
    mask_after_drop: torch.Tensor, score: torch.Tensor, forbidden: torch.Tensor
) -> torch.Tensor:
    """Grow as many whole units as ``forbidden`` (the drop set) holds, highest ``score`` first."""
    m = _rows(mask_after_drop)
    units, _ = m.shape
    f = _rows(forbidden)
    r = int(f.all(1).sum()) if bool(f.any()) else 0
    cand = ~m.any(1) & ~f.any(1)
    if r > int(cand.sum()):
        raise ValueError(f"channel_grow: cannot grow {r} units, only {int(cand.sum())} candidates")
    out = torch.zeros_like(m)
    if r == 0:
        return out.view(mask_after_drop.shape)
    s = _unit_score(score, units).masked_fill(~cand, -math.inf)
    out[torch.argsort(s, descending=True, stable=True)[:r]] = True
    return out.view(mask_after_drop.shape)


def _drop_per_segment(mask: torch.Tensor, score: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Drop the ``q[i]`` lowest-score active entries of every segment row i of [S, L] tensors."""
    s = torch.nan_to_num(score.detach().float(), nan=-math.inf).masked_fill(~mask, math.inf)
    order = torch.argsort(s, dim=1, stable=True)  # [S, L] ascending, active first
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(s.shape[1]).expand_as(order).contiguous())
    return (rank < q.unsqueeze(1)) & mask


def grow_per_segment(
    mask_after_drop: torch.Tensor, score: torch.Tensor, forbidden: torch.Tensor, seg: int
) -> torch.Tensor:
    """In every segment of ``seg`` consecutive entries (a row, an N:M group), grow as many
    inactive, non-forbidden entries as ``forbidden`` holds there, highest ``score`` first."""
    shape = mask_after_drop.shape
    m = mask_after_drop.reshape(-1, seg)  # [S, seg]
    f = forbidden.reshape(-1, seg)
    cand = ~m & ~f
    q = f.sum(1)  # [S] entries to regrow per segment
    if bool((q > cand.sum(1)).any()):
        raise ValueError("grow_per_segment: a segment has fewer candidates than drops to regrow")
    s = torch.nan_to_num(score.detach().float().reshape(-1, seg), nan=-math.inf)
    s = s.masked_fill(~cand, -math.inf)
    order = torch.argsort(s, dim=1, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(seg).expand_as(order).contiguous())
    return ((rank < q.unsqueeze(1)) & cand).view(shape)


def fanin_drop(mask: torch.Tensor, score: torch.Tensor, n: int) -> torch.Tensor:
    """Constant fan-in drop: ``q = round(n / active_units)`` lowest-score entries per active unit.

    ``q`` is capped so every active unit keeps >= 1 input and can regrow ``q`` (the row has
    ``fan_in - k >= q`` inactive entries), so the fan-in ``k`` is the same after grow.
    """
    m = _rows(mask)
    k = m.sum(1)  # [units]
    act = k > 0
    if not bool(act.any()):
        return torch.zeros_like(mask)
    n_act = int(act.sum())
    kmin, kmax = int(k[act].min()), int(k[act].max())
    q = min(round(n / n_act), kmin - 1, m.shape[1] - kmax)
    if q <= 0:
        return torch.zeros_like(mask)
    per = torch.where(act, q, 0)
    return _drop_per_segment(m, _rows(score), per).view(mask.shape)


def nm_drop(mask: torch.Tensor, score: torch.Tensor, n: int, m: int = NM[1]) -> torch.Tensor:
    """N:M drop: one entry (the lowest-score active one) in each of the ``n`` groups whose
    lowest active score is smallest; the grow then refills those groups, keeping N per M."""
    g = mask.reshape(-1, m)  # [G, m]
    s = torch.nan_to_num(score.detach().float().reshape(-1, m), nan=-math.inf)
    s = s.masked_fill(~g, math.inf)
    has = g.any(1) & (g.sum(1) < m)  # a group full (n == m) cannot regrow elsewhere
    weakest = s.min(1).values.masked_fill(~has, math.inf)  # [G]
    r = min(n, int(has.sum()))
    q = torch.zeros(g.shape[0], dtype=torch.int64)
    if r > 0:
        q[torch.argsort(weakest, stable=True)[:r]] = 1
    return _drop_per_segment(g, s, q).view(mask.shape)


def check_structure(mask: torch.Tensor, kind: str, nm: tuple[int, int] = NM) -> None:
    """Raise MaskError unless ``mask`` has structure ``kind`` (channel | fanin | nm)."""
    m = _rows(mask)
    if kind == "channel":
        if bool((m.any(1) & ~m.all(1)).any()):
            raise MaskError("channel mask has a partially active unit")
    elif kind == "fanin":
        k = m.sum(1)
        if k[k > 0].unique().numel() > 1:
            raise MaskError(f"fan-in is not constant: {sorted(set(k[k > 0].tolist()))}")
    elif kind == "nm":
        if mask.numel() % nm[1] or bool((mask.reshape(-1, nm[1]).sum(1) != nm[0]).any()):
            raise MaskError(f"mask is not {nm[0]}:{nm[1]}")
    else:
        raise ValueError(f"unknown structure {kind!r}")


def _topk_rows(score: torch.Tensor, k: int) -> torch.Tensor:
    """Bool [S, L]: the k highest-score entries of every row (stable ties: lower index)."""
    order = torch.argsort(score, dim=1, descending=True, stable=True)[:, :k]
    out = torch.zeros(score.shape, dtype=torch.bool)
    out.scatter_(1, order, True)
    return out


def _structured_from_scores(
    score: torch.Tensor, kind: str, density: float, nm: tuple[int, int]
) -> torch.Tensor:
    """Best mask of structure ``kind`` under ``score`` at ``density``, shape of ``score``."""
    s = _rows(score.double())
    units, fan_in = s.shape
    if kind == "channel":
        r = min(units, max(1, round(density * units)))
        keep = torch.argsort(s.sum(1), descending=True, stable=True)[:r]
        out = torch.zeros(s.shape, dtype=torch.bool)
        out[keep] = True
    elif kind == "fanin":
        out = _topk_rows(s, min(fan_in, max(1, round(density * fan_in))))
    elif kind == "nm":
        out = _topk_rows(score.double().reshape(-1, nm[1]), nm[0])
    else:
        raise ValueError(f"unknown structure {kind!r}")
    return out.view(score.shape)


def structured_init(
    shapes: Mapping[str, torch.Size | tuple[int, ...]],
    densities: Mapping[str, float],
    kinds: Mapping[str, str],
    generator: torch.Generator | None = None,
    nm: tuple[int, int] = NM,
    unit_rows: Mapping[str, torch.Tensor] | None = None,
) -> Mask:
    """Random mask where tensor ``name`` has structure ``kinds[name]`` at ``densities[name]``.

    channel: ``max(1, round(d * units))`` random whole units; fanin: ``max(1, round(d *
    fan_in))`` random inputs in every unit; nm: ``n`` random entries per group of ``m``.
    ``unit_rows[name]`` ([units, rows of a unit], ``units.unit_row_index``): a channel unit
    is several rows (an attention head's q/k/v rows), kept or dropped together.
    """
    out: Mask = {}
    for name, shape in shapes.items():
        kind = kinds[name]
        if kind == "nm" and math.prod(shape) % nm[1]:
            raise MaskError(
                f"{name}: {math.prod(shape)} entries do not split into groups of {nm[1]}"
            )
        score = torch.rand(tuple(shape), generator=generator)
        rows = (unit_rows or {}).get(name) if kind == "channel" else None
        d = float(densities[name])
        if rows is None:
            out[name] = _structured_from_scores(score, kind, d, nm)
        else:
            picked = _structured_from_scores(to_units(score, rows), kind, d, nm)
            out[name] = from_units(picked, rows, shape)
    return out


def to_units(t: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """[units, rows of a unit * fan_in]: the rows ``rows[u]`` of ``t`` side by side per unit."""
    return t.reshape(t.shape[0], -1)[rows.reshape(-1)].reshape(rows.shape[0], -1)


def from_units(
    u: torch.Tensor, rows: torch.Tensor, shape: torch.Size | tuple[int, ...]
) -> torch.Tensor:
    """Inverse of ``to_units``: a tensor of ``shape`` with unit u's entries at ``rows[u]``."""
    out = torch.empty(shape[0], math.prod(shape[1:]), dtype=u.dtype)
    out[rows.reshape(-1)] = u.reshape(rows.numel(), -1)
    return out.view(tuple(shape))


def structured_vote(
    votes: torch.Tensor, kind: str, density: float, tiebreak: torch.Tensor, nm: tuple[int, int] = NM
) -> torch.Tensor:
    """FedDST consensus vote with structure: units (channel) or entries per unit (fanin) or per
    group (nm) ranked by examples-weighted votes, ties to the larger |tiebreak|."""
    # votes are sums of example counts (integers): adding |v| / (1 + max|v|) < 1 breaks ties
    # by magnitude without reordering different vote counts.
    mag = tiebreak.detach().abs().double()
    score = votes.double().floor() + mag / (1.0 + float(mag.max()) if mag.numel() else 1.0)
    return _structured_from_scores(score, kind, density, nm)


def ablate_units(
    mask: torch.Tensor,
    weight: torch.Tensor,
    grad: torch.Tensor,
    n_update: int,
    gamma: float = 0.3,
) -> torch.Tensor:
    """SRigL neuron ablation (Lasby et al. 2023, Sec. 3): remove units with too few salient
    weights and give their budget to the others as a larger constant fan-in.

    Salient = what unstructured RigL would keep this update: the ``K - n_update`` active
    entries with the largest |w| plus the ``n_update`` inactive ones with the largest |g|
    (K = active count). A live unit with fewer than ``gamma * k`` salient entries is ablated
    (at least ``ceil(K / fan_in)`` units survive). The R survivors get fan-in ``k' = K // R``,
    chosen per row salient first, then active, then by |w| (active) or |g| (inactive), so the
    count becomes ``R * k'``: it drops by ``K mod R < R`` (SRigL keeps it "approximately").
    Without ablation the mask is returned unchanged.
    """
    m = _rows(mask)
    alive = m.any(1)
    counts = m.sum(1)
    if not bool(alive.any()):
        return mask.clone()
    k = int(counts[alive].max())
    total = int(m.sum())
    n_update = max(0, min(n_update, total, m.numel() - total))
    w = _rows(weight.detach().abs().float())
    g = _rows(grad.detach().abs().float())
    keep = _topk_flat(torch.where(m, w, -math.inf), total - n_update) & m
    grow = _topk_flat(torch.where(m, -math.inf, g), n_update) & ~m
    salient = keep | grow
    n_sal = salient.sum(1)
    ablate = alive & (n_sal < gamma * k)
    # The survivors must hold the budget: R >= ceil(K / fan_in). Spare the most salient.
    need = -(-total // m.shape[1]) - int((alive & ~ablate).sum())
    if need > 0:
        order = torch.argsort(n_sal.masked_fill(~ablate, -1), descending=True, stable=True)
        ablate[order[:need]] = False
    if not bool(ablate.any()):
        return mask.clone()
    survivors = alive & ~ablate
    k_new = total // int(survivors.sum())  # <= fan_in since R >= ceil(K / fan_in)
    # Lexicographic priority per row: salient (4), active (2), then the normalised value.
    val = torch.where(m, w / (float(w.max()) + 1e-12), g / (float(g.max()) + 1e-12))
    prio = 4.0 * salient + 2.0 * m + val.clamp(0.0, 0.999)
    out = _topk_rows(prio.double(), k_new) & survivors.unsqueeze(1)
    return out.view(mask.shape)


def _topk_flat(score: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of the k highest entries of ``score`` over the whole tensor."""
    out = torch.zeros(score.numel(), dtype=torch.bool)
    if k > 0:
        out[torch.argsort(score.reshape(-1), descending=True, stable=True)[:k]] = True
    return out.view(score.shape)
