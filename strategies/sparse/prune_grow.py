"""Prune and grow as pure functions over (mask, scores) -> mask, plus drop/grow rule registries.

Selection is separate from scoring (see ``scores``): ``drop_lowest`` picks the n ACTIVE
entries with the lowest score, ``grow_highest`` the n INACTIVE, non-forbidden entries with
the highest score. ``prune_and_grow`` combines them as in SET (Mocanu et al. 2018) and RigL
(Evci et al. 2020) and asserts the invariants: the active count is kept, dropped and grown
sets are disjoint, and grown entries were inactive before (a just-dropped entry is never
re-grown in the same update).

Extending: a drop rule is ``(LayerState, n) -> drop set`` and a grow rule is
``(LayerState, mask_after_drop, forbidden, n) -> grow set`` (``DropRule`` / ``GrowRule``
Protocols). Structured rules (constant fan-in, Evci et al. 2022 SRigL; whole-channel
removal) are one more function registered with ``register_drop_rule`` /
``register_grow_rule``: e.g. a constant-fan-in grow rule selects the top-k per output row
instead of globally per tensor. Ties are broken by position (stable sort), so selection is
deterministic given the scores.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from strategies.sparse.scores import gradient_score, magnitude_score, random_score

__all__ = [
    "DROP_RULES",
    "GROW_RULES",
    "DropRule",
    "GrowRule",
    "LayerState",
    "check_prune_grow",
    "drop_lowest",
    "get_drop_rule",
    "get_grow_rule",
    "gradient_grow",
    "grow_highest",
    "magnitude_drop",
    "magnitude_prune_to",
    "prune_and_grow",
    "random_grow",
    "register_drop_rule",
    "register_grow_rule",
]


def _check(mask: torch.Tensor, score: torch.Tensor, n: int, what: str) -> None:
    if mask.dtype != torch.bool:
        raise ValueError(f"{what}: mask must be bool, got {mask.dtype}")
    if score.shape != mask.shape:
        raise ValueError(
            f"{what}: score shape {tuple(score.shape)} != mask shape {tuple(mask.shape)}"
        )
    if n < 0:
        raise ValueError(f"{what}: n must be >= 0, got {n}")


def _stable_top(s: torch.Tensor, n: int, largest: bool) -> torch.Tensor:
    """Bool selector of the first ``n`` entries of a stable sort of 1-D ``s`` (no NaN).

    The same set as ``argsort(s, descending=largest, stable=True)[:n]``: every entry
    strictly beyond the n-th value t, then entries equal to t by position. ``topk`` finds
    t without sorting all candidates (n is a small fraction of a layer).
    """
    out = torch.zeros(s.numel(), dtype=torch.bool, device=s.device)
    if n == 0:
        return out
    if n >= s.numel():
        return out.fill_(True)
    kth = torch.topk(s, n, largest=largest, sorted=False).values
    t = kth.min() if largest else kth.max()
    beyond = s > t if largest else s < t
    out |= beyond
    ties = (s == t).nonzero().squeeze(1)[: n - int(beyond.sum())]
    out[ties] = True
    return out


def drop_lowest(mask: torch.Tensor, score: torch.Tensor, n: int) -> torch.Tensor:
    """Bool tensor of the ``n`` active entries of ``mask`` with the lowest ``score``."""
    _check(mask, score, n, "drop_lowest")
    flat_mask = mask.reshape(-1)
    active = flat_mask.nonzero().squeeze(1)  # [n_active] flat indices
    if n > active.numel():
        raise ValueError(f"drop_lowest: cannot drop {n} of {active.numel()} active entries")
    # A NaN score marks a broken weight: rank it lowest so it is dropped first.
    s = torch.nan_to_num(score.detach().reshape(-1)[active].float(), nan=-float("inf"))
    out = torch.zeros_like(flat_mask)
    out[active[_stable_top(s, n, largest=False)]] = True
    return out.view(mask.shape)


def grow_highest(
    mask_after_drop: torch.Tensor,
    score: torch.Tensor,
    n: int,
    forbidden: torch.Tensor | None = None,
) -> torch.Tensor:
    """Bool tensor of the ``n`` inactive, non-forbidden entries with the highest ``score``."""
    _check(mask_after_drop, score, n, "grow_highest")
    candidate = ~mask_after_drop
    if forbidden is not None:
        if forbidden.shape != mask_after_drop.shape:
            raise ValueError(
                f"grow_highest: forbidden shape {tuple(forbidden.shape)} != mask shape "
                f"{tuple(mask_after_drop.shape)}"
            )
        candidate = candidate & ~forbidden.to(torch.bool)
    cand = candidate.reshape(-1).nonzero().squeeze(1)  # [n_candidates] flat indices
    if n > cand.numel():
        raise ValueError(f"grow_highest: cannot grow {n}, only {cand.numel()} candidates")
    s = torch.nan_to_num(score.detach().reshape(-1)[cand].float(), nan=-float("inf"))
    out = torch.zeros(mask_after_drop.numel(), dtype=torch.bool, device=mask_after_drop.device)
    out[cand[_stable_top(s, n, largest=True)]] = True
    return out.view(mask_after_drop.shape)


def prune_and_grow(
    mask: torch.Tensor, drop_score: torch.Tensor, grow_score: torch.Tensor, n: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Drop ``n`` lowest-``drop_score`` active entries, grow ``n`` highest-``grow_score`` ones.

    Returns ``(new_mask, dropped, grown)``. Grown entries are taken from those inactive
    BEFORE the drop, so ``n <= min(active, inactive)`` is required.
    """
    dropped = drop_lowest(mask, drop_score, n)
    after_drop = mask & ~dropped
    grown = grow_highest(after_drop, grow_score, n, forbidden=dropped)
    new_mask = after_drop | grown
    check_prune_grow(mask, dropped, grown, new_mask)
    return new_mask, dropped, grown


def check_prune_grow(
    mask: torch.Tensor,
    dropped: torch.Tensor,
    grown: torch.Tensor,
    new_mask: torch.Tensor,
    name: str = "prune_and_grow",
) -> None:
    """Raise RuntimeError unless a prune+grow update kept its invariants.

    dropped subset of mask; grown disjoint from mask (hence from dropped);
    new_mask == (mask - dropped) + grown; active count unchanged. RuntimeError, not assert,
    so the checks survive ``python -O``.
    """
    if bool((dropped & ~mask).any()):
        raise RuntimeError(f"{name}: dropped an entry that was not active")
    if bool((dropped & grown).any()):
        raise RuntimeError(f"{name}: dropped and grown sets overlap")
    if bool((grown & mask).any()):
        raise RuntimeError(f"{name}: grew an entry that was already active")
    if not torch.equal(new_mask, (mask & ~dropped) | grown):
        raise RuntimeError(f"{name}: new mask != (mask - dropped) + grown")
    if int(new_mask.sum()) != int(mask.sum()):
        raise RuntimeError(
            f"{name}: active count changed {int(mask.sum())} -> {int(new_mask.sum())}"
        )


def magnitude_prune_to(mask: torch.Tensor, score: torch.Tensor, target_active: int) -> torch.Tensor:
    """Keep the ``target_active`` highest-score active entries (GMP, Zhu & Gupta 2017).

    Never grows: if ``target_active >= active`` the mask is returned unchanged (as a copy).
    """
    _check(mask, score, max(target_active, 0), "magnitude_prune_to")
    if target_active < 0:
        raise ValueError(f"magnitude_prune_to: target_active must be >= 0, got {target_active}")
    active = int(mask.sum())
    if target_active >= active:
        return mask.clone()
    return mask & ~drop_lowest(mask, score, active - target_active)


# --- rule registries -------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerState:
    """What a drop/grow rule may look at for one tensor (shapes all equal ``weight.shape``)."""

    name: str
    weight: torch.Tensor
    mask: torch.Tensor
    dense_grad: torch.Tensor | None = None  # full dL/dW before masked grads are zeroed
    generator: torch.Generator | None = None
    structure: str = "none"  # "none" | "channel" | "fanin" | "nm" (see ``structured``)


class DropRule(Protocol):
    """Chooses the n active entries to drop."""

    def __call__(self, layer: LayerState, n: int) -> torch.Tensor: ...


class GrowRule(Protocol):
    """Chooses the n inactive, non-forbidden entries to grow."""

    def __call__(
        self, layer: LayerState, mask_after_drop: torch.Tensor, forbidden: torch.Tensor, n: int
    ) -> torch.Tensor: ...


def magnitude_drop(layer: LayerState, n: int) -> torch.Tensor:
    """Drop the smallest-|w| active weights (SET, RigL)."""
    return drop_lowest(layer.mask, magnitude_score(layer.weight), n)


def random_grow(
    layer: LayerState, mask_after_drop: torch.Tensor, forbidden: torch.Tensor, n: int
) -> torch.Tensor:
    """Grow uniformly at random among candidates (SET, Mocanu et al. 2018)."""
    score = random_score(layer.mask.shape, layer.generator).to(layer.mask.device)
    return grow_highest(mask_after_drop, score, n, forbidden)


def gradient_grow(
    layer: LayerState, mask_after_drop: torch.Tensor, forbidden: torch.Tensor, n: int
) -> torch.Tensor:
    """Grow the largest-|dense gradient| entries (RigL, Evci et al. 2020)."""
    if layer.dense_grad is None:
        raise ValueError(f"{layer.name}: gradient grow needs the dense gradient")
    return grow_highest(mask_after_drop, gradient_score(layer.dense_grad), n, forbidden)


DROP_RULES: dict[str, DropRule] = {"magnitude": magnitude_drop}
GROW_RULES: dict[str, GrowRule] = {"random": random_grow, "gradient": gradient_grow}


def register_drop_rule(name: str, rule: DropRule) -> None:
    """Add a drop rule (e.g. structured channel removal) under ``name``."""
    if name in DROP_RULES:
        raise ValueError(f"drop rule {name!r} already registered")
    DROP_RULES[name] = rule


def register_grow_rule(name: str, rule: GrowRule) -> None:
    """Add a grow rule (e.g. constant fan-in top-k per row) under ``name``."""
    if name in GROW_RULES:
        raise ValueError(f"grow rule {name!r} already registered")
    GROW_RULES[name] = rule


def get_drop_rule(name: str) -> DropRule:
    """Look a drop rule up by name."""
    try:
        return DROP_RULES[name]
    except KeyError:
        raise ValueError(f"unknown drop rule {name!r}; known: {sorted(DROP_RULES)}") from None


def get_grow_rule(name: str) -> GrowRule:
    """Look a grow rule up by name."""
    try:
        return GROW_RULES[name]
    except KeyError:
        raise ValueError(f"unknown grow rule {name!r}; known: {sorted(GROW_RULES)}") from None
