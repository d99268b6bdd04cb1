"""Pure, mask-aware merge rules (mean, median, trimmed mean) and the FedDST consensus mask.

Every rule sees, per coordinate, only the clients whose mask keeps it: a pruned entry is
"no opinion", not a vote for zero. A coordinate no client keeps keeps its PREVIOUS global
value (so an update never silently zeroes weights nobody trained; the strategy then
re-applies the consensus mask, which zeroes whatever falls outside it).

The consensus mask follows FedDST (Bibikar et al., AAAI 2022): clients prune and regrow
locally, the server sums their masks as votes weighted by examples and keeps the top-k
coordinates per layer, k = round(density_l * numel_l), breaking ties by |merged value|.

A merge rule is any callable ``rule(updates, previous) -> {name: tensor}`` (`MergeRule`);
built-ins are registered by name in ``strategies.aggregation.rules.MERGE_RULES`` ("mean",
"median", "trimmed-mean", and the Byzantine-robust rules of `strategies.aggregation.robust`:
"clipped-median", "krum", "multi-krum", "bulyan"), each built from the run's `MergeOptions`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import torch

from strategies.sparse.masks import Mask
from strategies.sparse.structured import from_units, structured_vote, to_units


@dataclass
class ClientUpdate:
    """One client's decoded reply: full-shape values (zeros off-mask) and its mask."""

    node_id: int
    values: dict[str, torch.Tensor]
    mask: Mask  # bool per sparsified key; keys absent here are dense (kept everywhere)
    num_examples: int
    metrics: dict[str, float | int] = field(default_factory=dict)


class MergeRule(Protocol):
    """User plug-in: merge accepted client updates into the next global values."""

    def __call__(
        self, updates: list[ClientUpdate], previous: dict[str, torch.Tensor], /
    ) -> dict[str, torch.Tensor]: ...


def _check(updates: list[ClientUpdate], previous: dict[str, torch.Tensor]) -> list[str]:
    if not updates:
        raise ValueError("cannot merge an empty list of client updates")
    keys = list(previous)
    for u in updates:
        if set(u.values) != set(keys):
            raise ValueError(
                f"update from node {u.node_id} has keys {sorted(u.values)}, expected {sorted(keys)}"
            )
        if u.num_examples <= 0:
            raise ValueError(f"update from node {u.node_id} has num_examples={u.num_examples}")
    return keys


def stack_kept(
    updates: list[ClientUpdate], key: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stack one tensor over clients for a merge rule.

    Returns (values [C, *shape] float64, keep [C, *shape] bool, weights [C] float64 =
    num_examples). Clients with no mask entry for `key` keep every coordinate.
    """
    keep, weights = stack_keep(updates, key)
    return stack_values(updates, key), keep, weights


def stack_values(updates: list[ClientUpdate], key: str) -> torch.Tensor:
    """One tensor over clients as float64 [C, *shape]."""
    return _stack([u.values[key].detach() for u in updates]).to(torch.float64)


def _stack(parts: list[torch.Tensor]) -> torch.Tensor:
    """[C, ...] in the parts' one dtype (converted once, by the caller, as a whole stack),
    or float64 when the parts' dtypes differ."""
    if len({t.dtype for t in parts}) == 1:
        return torch.stack(parts)
    return torch.stack([t.to(torch.float64) for t in parts])


def stack_keep(updates: list[ClientUpdate], key: str) -> tuple[torch.Tensor, torch.Tensor]:
    """`stack_kept` without the values: (keep [C, *shape] bool, weights [C] float64)."""
    keep = torch.stack(
        [
            u.mask[key].bool()
            if key in u.mask
            else torch.ones_like(u.values[key], dtype=torch.bool)
            for u in updates
        ]
    )
    return keep, _weights(updates)


def weighted_keep(keep: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``keep.to(float64) * weights`` per client ([C, *shape] float64), in one pass.

    With every weight positive and finite, 1.0 * w is w and 0.0 * w is +0.0 exactly, so
    selecting w or 0.0 gives the product's very bits without materialising the float
    copy of ``keep`` (the merge's largest temporary). Other weights take the product.
    """
    w = weights.view(-1, *([1] * (keep.dim() - 1)))
    if bool(torch.isfinite(weights).all()) and bool((weights > 0).all()):
        return torch.where(keep, w, torch.zeros((), dtype=torch.float64))
    return keep.to(torch.float64) * w


def _finish(merged: torch.Tensor, covered: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
    """Uncovered coordinates keep `prev`; cast back to the previous dtype (round if integer)."""
    out = torch.where(covered, merged, prev.to(torch.float64))
    if prev.dtype.is_floating_point:
        return out.to(prev.dtype)
    return out.round().to(prev.dtype)


def masked_weighted_mean(
    updates: list[ClientUpdate], previous_global: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Per coordinate: sum_i w_i m_i v_i / sum_i w_i m_i over keeping clients (w_i = examples).

    With all-ones masks this is exactly FedAvg (McMahan et al. 2017).
    """
    out: dict[str, torch.Tensor] = {}
    for key in _check(updates, previous_global):
        if all(key in u.mask for u in updates):
            out[key] = _sparse_mean(updates, key, previous_global[key])
            continue
        if not any(key in u.mask for u in updates):
            out[key] = _dense_mean(updates, key, previous_global[key])
            continue
        vals, keep, w = stack_kept(updates, key)  # [C, *shape], [C, *shape], [C]
        out[key] = _finish(*_ratio(weighted_keep(keep, w), vals), previous_global[key])
    return out


def _ratio(wk: torch.Tensor, vals: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum wk v / sum wk, sum wk > 0) over clients (dim 0); wk = w m per client."""
    denom = wk.sum(0)
    return (wk * vals).sum(0) / denom.clamp_min(1e-300), denom > 0


def _sparse_mean(updates: list[ClientUpdate], key: str, prev: torch.Tensor) -> torch.Tensor:
    """`masked_weighted_mean` of one key every client masks, computed only on the
    coordinates some client keeps ([C, K], K ~ density x numel instead of [C, numel]).

    Each merged coordinate is the same formula over the same clients in the same order.
    torch's order of summing clients can depend on the tensor's width, so a float64 model
    may differ from the [C, numel] result in the last bit; fp32 values give its very bits
    (their float64 weighted sums are exact; both tested). Off the union nobody keeps
    anything and `_finish` keeps `prev` there either way.
    """
    keep, w = stack_keep(updates, key)  # [C, *shape] bool, [C]
    flat_keep = keep.reshape(len(updates), -1)  # [C, N]
    # any(0) over clients as a uint8 max: the same answer, ~60x faster than bool any(0)
    idx = flat_keep.view(torch.uint8).amax(0).nonzero().reshape(-1)  # [K] kept by someone
    # gathered before the float64 conversion: [C, K] converted, not [C, N]
    vals = _stack([u.values[key].detach().reshape(-1) for u in updates])[:, idx]  # [C, K]
    wk = weighted_keep(flat_keep[:, idx], w)
    merged_k, covered_k = _ratio(wk, vals.to(torch.float64))
    merged = torch.zeros(prev.numel(), dtype=torch.float64)
    covered = torch.zeros(prev.numel(), dtype=torch.bool)
    merged[idx], covered[idx] = merged_k, covered_k
    return _finish(merged.view(prev.shape), covered.view(prev.shape), prev)


def _dense_mean(updates: list[ClientUpdate], key: str, prev: torch.Tensor) -> torch.Tensor:
    """`masked_weighted_mean` of a key no client masks: every client keeps every coordinate,
    so w m = w and the weighted sums need no [C, *shape] keep tensor (the same products
    summed in the same order: the same bits)."""
    vals, w = stack_values(updates, key), _weights(updates)  # [C, *shape] float64, [C]
    wk = w.view(-1, *([1] * (vals.dim() - 1))).expand_as(vals)
    return _finish(*_ratio(wk, vals), prev)


def _weights(updates: list[ClientUpdate]) -> torch.Tensor:
    return torch.tensor([float(u.num_examples) for u in updates], dtype=torch.float64)


def _sorted_kept(vals: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Kept values sorted ascending along clients (non-kept pushed to the end) and counts."""
    filled = torch.where(keep, vals, torch.full_like(vals, float("inf")))
    return filled.sort(dim=0).values, keep.sum(0)


def _check_support(min_support: int) -> None:
    if min_support < 1:
        raise ValueError(f"min_support must be >= 1, got {min_support}")


def median_of_kept(vals: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per coordinate, the median of the kept values (mean of the two middles) and the count.

    vals, keep: [C, *shape]; returns ([*shape] float64, [*shape] int64). Where the count is
    0 the median is meaningless (callers keep the previous value there).
    """
    srt, count = _sorted_kept(vals, keep)  # [C, *shape], [*shape]
    c = count.clamp_min(1).unsqueeze(0)
    lower = srt.gather(0, (c - 1) // 2).squeeze(0)
    upper = srt.gather(0, c // 2).squeeze(0)
    return (lower + upper) / 2, count


def coordinate_median(
    updates: list[ClientUpdate], previous_global: dict[str, torch.Tensor], min_support: int = 1
) -> dict[str, torch.Tensor]:
    """Coordinate-wise median over keeping clients (Yin et al. 2018; mean of the two middles).

    A coordinate kept by fewer than `min_support` clients keeps its previous global value:
    with f attackers, ``min_support = 2f + 1`` guarantees an honest majority wherever a
    median is taken, so one client's private coordinates (a random mask) cannot be written.
    """
    _check_support(min_support)
    out: dict[str, torch.Tensor] = {}
    for key in _check(updates, previous_global):
        vals, keep, _ = stack_kept(updates, key)
        med, count = median_of_kept(vals, keep)
        out[key] = _finish(med, count >= min_support, previous_global[key])
    return out


def trimmed_mean(
    updates: list[ClientUpdate],
    previous_global: dict[str, torch.Tensor],
    beta: float = 0.2,
    min_trim: int = 0,
    min_support: int = 1,
) -> dict[str, torch.Tensor]:
    """Coordinate-wise beta-trimmed mean (Yin et al. 2018) over the c clients keeping each entry.

    Per coordinate: t = max(floor(beta * c), min_trim) lowest and t highest kept values are
    dropped and the c - 2t left averaged (unweighted, as in the paper). ``beta * c`` rounds
    to 0 where few clients keep a coordinate, so `min_trim` (the assumed number of
    attackers f) makes the trim real there. A coordinate with c < max(min_support, 2t + 1)
    keeps its previous global value. Needs 0 <= beta < 0.5. With all-ones masks and the
    defaults this is Flower's FedTrimmedAvg (``trim_mean``).
    """
    if not 0.0 <= beta < 0.5:
        raise ValueError(f"trim fraction beta must be in [0, 0.5), got {beta}")
    if min_trim < 0:
        raise ValueError(f"min_trim must be >= 0, got {min_trim}")
    _check_support(min_support)
    out: dict[str, torch.Tensor] = {}
    for key in _check(updates, previous_global):
        vals, keep, _ = stack_kept(updates, key)
        srt, count = _sorted_kept(vals, keep)
        t = torch.floor(count.to(torch.float64) * beta).to(torch.int64).clamp_min(min_trim)
        pos = torch.arange(len(updates)).view(-1, *([1] * (vals.dim() - 1)))  # [C, 1, ...]
        sel = (pos >= t) & (pos < count - t)
        total = torch.where(sel, srt, torch.zeros_like(srt)).sum(0)
        left = count - 2 * t  # [*shape]
        merged = total / left.clamp_min(1).to(torch.float64)
        out[key] = _finish(merged, (left >= 1) & (count >= min_support), previous_global[key])
    return out


def consensus_mask(
    updates: list[ClientUpdate],
    target_densities: dict[str, float],
    values_for_tiebreak: dict[str, torch.Tensor],
    structure: Mapping[str, str] | None = None,
    unit_rows: Mapping[str, torch.Tensor] | None = None,
) -> Mask:
    """FedDST mask vote: keep the top-k coordinates per layer by examples-weighted votes.

    votes_l = sum_i n_i * m_i,l ; see `consensus_from_votes` for k, ties and structures.
    """
    if not updates:
        raise ValueError("cannot vote a consensus mask from no client updates")
    votes: dict[str, torch.Tensor] = {}
    for key, density in target_densities.items():
        if not 0.0 <= density <= 1.0:
            raise ValueError(f"target density for {key!r} must be in [0, 1], got {density}")
        if key not in values_for_tiebreak:
            raise ValueError(f"no tie-break values for masked key {key!r}")
        keep, w = stack_keep(updates, key)  # the values are not needed for a vote
        votes[key] = weighted_keep(keep, w).sum(0)
    return consensus_from_votes(votes, target_densities, values_for_tiebreak, structure, unit_rows)


def consensus_from_votes(
    votes: dict[str, torch.Tensor],
    target_densities: dict[str, float],
    values_for_tiebreak: dict[str, torch.Tensor],
    structure: Mapping[str, str] | None = None,
    unit_rows: Mapping[str, torch.Tensor] | None = None,
) -> Mask:
    """Top-k coordinates per layer by vote, k_l = clamp(round(d_l * numel_l), 1, numel_l).

    Ties in votes go to the larger |values_for_tiebreak|, then to the lower flat index. A
    layer with a ``structure`` ("channel" | "fanin" | "nm") votes whole units / k entries per
    unit / N per group instead (``strategies.sparse.structured.structured_vote``). Secure
    aggregation hands in vote sums it never saw per client. ``unit_rows[key]`` ([units,
    rows of a unit]) makes a channel unit several rows (an attention head), voted whole.
    """
    out: Mask = {}
    for key, density in target_densities.items():
        if not 0.0 <= density <= 1.0:
            raise ValueError(f"target density for {key!r} must be in [0, 1], got {density}")
        if key not in values_for_tiebreak or key not in votes:
            raise ValueError(f"no votes or tie-break values for masked key {key!r}")
        kind = (structure or {}).get(key, "none")
        rows = (unit_rows or {}).get(key) if kind == "channel" else None
        if kind != "none" and rows is not None:  # multi-row units (heads): whole units
            v, tb = to_units(votes[key], rows), to_units(values_for_tiebreak[key], rows)
            picked = structured_vote(v, kind, density, tb)
            out[key] = from_units(picked, rows, votes[key].shape)
            continue
        if kind != "none":
            out[key] = structured_vote(votes[key], kind, density, values_for_tiebreak[key])
            continue
        flat_votes = votes[key].to(torch.float64).reshape(-1)
        n = flat_votes.numel()
        k = min(n, max(1, round(density * n)))
        mag = values_for_tiebreak[key].detach().abs().reshape(-1).to(torch.float64)
        # Lexicographic order (votes desc, |value| desc, index asc) by two stable sorts.
        by_mag = torch.sort(mag, descending=True, stable=True).indices
        by_vote = torch.sort(flat_votes[by_mag], descending=True, stable=True).indices
        chosen = by_mag[by_vote[:k]]
        m = torch.zeros(n, dtype=torch.bool)
        m[chosen] = True
        out[key] = m.reshape(votes[key].shape)
    return out


@dataclass(frozen=True)
class MergeOptions:
    """A rule's knobs from the run config (``aggregation.*``); each rule reads what it needs.

    trim: trimmed-mean fraction beta. num_malicious: f, the number of Byzantine clients a
    robust rule must tolerate (Krum, Bulyan, the trim floor). min_support: clients that must
    keep a coordinate for a robust rule to write it; 0 = 2f + 1. clip_norm: L2 bound on each
    client's update for "clipped-*" rules; 0 = the median update norm of the round.
    krum_select: updates multi-Krum averages; 0 = n - f. cap_weights: (multi-)Krum averages its
    selection with examples capped at the round's median count (an inflated ``num-examples``
    then buys nothing); off = Flower's examples-weighted average.
    """

    trim: float = 0.2
    num_malicious: int = 0
    min_support: int = 0
    clip_norm: float = 0.0
    krum_select: int = 0
    cap_weights: bool = False

    @property
    def support(self) -> int:
        """The effective minimum support (``2f + 1`` when left at 0)."""
        return self.min_support if self.min_support > 0 else 2 * self.num_malicious + 1


@dataclass(frozen=True)
class TrimmedMean:
    """The "trimmed-mean" rule with its trim fraction, trim floor and minimum support bound in."""

    beta: float = 0.2
    min_trim: int = 0
    min_support: int = 1

    def __call__(
        self, updates: list[ClientUpdate], previous: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        return trimmed_mean(updates, previous, self.beta, self.min_trim, self.min_support)


@dataclass(frozen=True)
class Median:
    """The "median" rule (FedMedian, mask-aware) with its minimum support bound in."""

    min_support: int = 1

    def __call__(
        self, updates: list[ClientUpdate], previous: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        return coordinate_median(updates, previous, self.min_support)


def robust_factory(name: str) -> Callable[[MergeOptions], MergeRule]:
    def make(options: MergeOptions) -> MergeRule:
        # Imported here: strategies.aggregation.robust builds on this module's primitives.
        from strategies.aggregation.robust import robust_rule

        return robust_rule(name, options)

    return make
