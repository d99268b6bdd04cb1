"""Pure, mask-aware merge rules (mean, median, trimmed mean) and the FedDST consensus mask.

Every rule sees, per coordinate, only the clients whose mask keeps it: a pruned entry is
"no opinion", not a vote for zero. A coordinate no client keeps keeps its PREVIOUS global
value (so an update never silently zeroes weights nobody trained; the strategy then
re-applies the consensus mask, which zeroes whatever falls outside it).

The consensus mask follows FedDST (Bibikar et al., AAAI 2022): clients prune and regrow
locally, the server sums their masks as votes weighted by examples and keeps the top-k
coordinates per layer, k = round(density_l * numel_l), breaking ties by |merged value|.

A merge rule is any callable ``rule(updates, previous) -> {name: tensor}`` (`MergeRule`);
built-ins are registered by name in `MERGE_RULES` ("mean", "median", "trimmed-mean").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch

from strategies.sparse.masks import Mask


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
    vals = torch.stack([u.values[key].detach().to(torch.float64) for u in updates])
    keep = torch.stack(
        [
            u.mask[key].bool()
            if key in u.mask
            else torch.ones_like(u.values[key], dtype=torch.bool)
            for u in updates
        ]
    )
    weights = torch.tensor([float(u.num_examples) for u in updates], dtype=torch.float64)
    return vals, keep, weights


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
        vals, keep, w = stack_kept(updates, key)  # [C, *shape], [C, *shape], [C]
        wk = keep.to(torch.float64) * w.view(-1, *([1] * (vals.dim() - 1)))
        denom = wk.sum(0)
        merged = (wk * vals).sum(0) / denom.clamp_min(1e-300)
        out[key] = _finish(merged, denom > 0, previous_global[key])
    return out


def _sorted_kept(vals: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Kept values sorted ascending along clients (non-kept pushed to the end) and counts."""
    filled = torch.where(keep, vals, torch.full_like(vals, float("inf")))
    return filled.sort(dim=0).values, keep.sum(0)


def coordinate_median(
    updates: list[ClientUpdate], previous_global: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Coordinate-wise median over keeping clients (Yin et al. 2018; mean of the two middles)."""
    out: dict[str, torch.Tensor] = {}
    for key in _check(updates, previous_global):
        vals, keep, _ = stack_kept(updates, key)
        srt, count = _sorted_kept(vals, keep)  # [C, *shape], [*shape]
        c = count.clamp_min(1).unsqueeze(0)
        lower = srt.gather(0, (c - 1) // 2).squeeze(0)
        upper = srt.gather(0, c // 2).squeeze(0)
        out[key] = _finish((lower + upper) / 2, count > 0, previous_global[key])
    return out


def trimmed_mean(
    updates: list[ClientUpdate], previous_global: dict[str, torch.Tensor], beta: float = 0.2
) -> dict[str, torch.Tensor]:
    """Coordinate-wise beta-trimmed mean (Yin et al. 2018) over the c clients keeping each entry.

    Drops t = floor(beta * c) lowest and t highest values, averages the c - 2t left
    (unweighted, as in the paper). Needs 0 <= beta < 0.5.
    """
    if not 0.0 <= beta < 0.5:
        raise ValueError(f"trim fraction beta must be in [0, 0.5), got {beta}")
    out: dict[str, torch.Tensor] = {}
    for key in _check(updates, previous_global):
        vals, keep, _ = stack_kept(updates, key)
        srt, count = _sorted_kept(vals, keep)
        t = torch.floor(count.to(torch.float64) * beta).to(torch.int64)  # [*shape]
        pos = torch.arange(len(updates)).view(-1, *([1] * (vals.dim() - 1)))  # [C, 1, ...]
        sel = (pos >= t) & (pos < count - t)
        total = torch.where(sel, srt, torch.zeros_like(srt)).sum(0)
        merged = total / (count - 2 * t).clamp_min(1).to(torch.float64)
        out[key] = _finish(merged, count > 0, previous_global[key])
    return out


def consensus_mask(
    updates: list[ClientUpdate],
    target_densities: dict[str, float],
    values_for_tiebreak: dict[str, torch.Tensor],
) -> Mask:
    """FedDST mask vote: keep the top-k coordinates per layer by examples-weighted votes.

    votes_l = sum_i n_i * m_i,l ; k_l = clamp(round(d_l * numel_l), 1, numel_l). Ties in
    votes go to the larger |values_for_tiebreak|, then to the lower flat index.
    """
    if not updates:
        raise ValueError("cannot vote a consensus mask from no client updates")
    out: Mask = {}
    for key, density in target_densities.items():
        if not 0.0 <= density <= 1.0:
            raise ValueError(f"target density for {key!r} must be in [0, 1], got {density}")
        if key not in values_for_tiebreak:
            raise ValueError(f"no tie-break values for masked key {key!r}")
        _, keep, w = stack_kept(updates, key)
        votes = (keep.to(torch.float64) * w.view(-1, *([1] * (keep.dim() - 1)))).sum(0)
        flat_votes = votes.reshape(-1)
        n = flat_votes.numel()
        k = min(n, max(1, round(density * n)))
        mag = values_for_tiebreak[key].detach().abs().reshape(-1).to(torch.float64)
        # Lexicographic order (votes desc, |value| desc, index asc) by two stable sorts.
        by_mag = torch.sort(mag, descending=True, stable=True).indices
        by_vote = torch.sort(flat_votes[by_mag], descending=True, stable=True).indices
        chosen = by_mag[by_vote[:k]]
        m = torch.zeros(n, dtype=torch.bool)
        m[chosen] = True
        out[key] = m.reshape(votes.shape)
    return out


@dataclass(frozen=True)
class TrimmedMean:
    """The "trimmed-mean" rule with its trim fraction bound in."""

    beta: float = 0.2

    def __call__(
        self, updates: list[ClientUpdate], previous: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        return trimmed_mean(updates, previous, self.beta)


# name -> factory(trim) -> rule; register your own with `register_merge_rule`.
MERGE_RULES: dict[str, Callable[[float], MergeRule]] = {
    "mean": lambda trim: masked_weighted_mean,
    "median": lambda trim: coordinate_median,
    "trimmed-mean": lambda trim: TrimmedMean(trim),
}


def register_merge_rule(name: str, factory: Callable[[float], MergeRule]) -> None:
    """Make a rule selectable by name (e.g. from run config ``aggregation.rule``)."""
    if name in MERGE_RULES:
        raise ValueError(f"merge rule {name!r} is already registered")
    MERGE_RULES[name] = factory


def get_merge_rule(rule: str | MergeRule, trim: float = 0.2) -> MergeRule:
    """Resolve a rule name (see MERGE_RULES) or pass a callable through."""
    if isinstance(rule, str):
        if rule not in MERGE_RULES:
            raise ValueError(f"unknown merge rule {rule!r}; known: {sorted(MERGE_RULES)}")
        return MERGE_RULES[rule](trim)
    if not callable(rule):
        raise TypeError(f"merge rule must be a name or a callable, got {type(rule).__name__}")
    return rule
