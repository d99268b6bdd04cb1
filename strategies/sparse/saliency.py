"""Initial masks beyond random: magnitude, SNIP and GraSP saliency, top-k per unit.

- magnitude: keep the largest |w| (one-shot magnitude pruning at init, Frankle & Carbin 2019);
- SNIP (Lee et al. 2019, "Single-shot Network Pruning"): connection sensitivity |g * w| from
  one mini-batch, g = dL/dw at init;
- GraSP (Wang et al. 2020, "Picking Winning Tickets Before Training by Preserving Gradient
  Flow"): S(-w) = -w * (H g); GraSP removes the weights with the LARGEST S, so the keep score
  is w * (H g). Hg is a Hessian-gradient product: grad of (g . stopgrad(g)) w.r.t. w.

Scores are computed on the dense model; each unit (a layer, or a slice of a fused projection,
see ``layout``) keeps its planned count ``round(d * numel)`` (>= 1) of its highest-scoring
entries, so the per-layer budget of ERK/uniform (and the overrides) is kept exactly. Ties are
broken by position (stable sort), so masks are deterministic given the scores.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn

from strategies.sparse.layout import join_units, unit_rows
from strategies.sparse.masks import Mask, MaskError, target_active_count

__all__ = ["INIT_METHODS", "saliency_mask", "saliency_scores"]

INIT_METHODS = ("random", "magnitude", "snip", "grasp")
LossFn = Callable[[nn.Module], torch.Tensor]


def saliency_scores(
    method: str,
    model: nn.Module,
    params: Mapping[str, nn.Parameter],
    loss_fn: LossFn | None = None,
) -> dict[str, torch.Tensor]:
    """Keep scores (higher = keep) for every parameter in ``params``.

    ``loss_fn(model) -> scalar loss`` on one mini-batch is needed for SNIP and GraSP.
    """
    if method == "magnitude":
        return {n: p.detach().abs().clone() for n, p in params.items()}
    if method not in ("snip", "grasp"):
        raise MaskError(f"unknown initial-mask method {method!r}; known: {INIT_METHODS}")
    if loss_fn is None:
        raise MaskError(f"initial mask {method!r} needs a mini-batch loss (loss_fn)")
    names = list(params)
    weights = [params[n] for n in names]
    was_training = model.training
    model.eval()  # no dropout noise in the saliency; BatchNorm uses running stats
    try:
        loss = loss_fn(model)
        if method == "snip":
            grads = torch.autograd.grad(loss, weights, allow_unused=True)
            return {
                n: (torch.zeros_like(w) if g is None else (g * w).detach().abs())
                for n, w, g in zip(names, weights, grads, strict=True)
            }
        grads = torch.autograd.grad(loss, weights, create_graph=True, allow_unused=True)
        pairs = [(g, w) for g, w in zip(grads, weights, strict=True) if g is not None]
        # z = g . stopgrad(g);  dz/dw = H g   (Pearlmutter's trick, as in GraSP)
        z = torch.stack([(g * g.detach()).sum() for g, _ in pairs]).sum()
        hg = torch.autograd.grad(z, weights, allow_unused=True)
        return {
            n: (torch.zeros_like(w) if h is None else (w * h).detach())
            for n, w, h in zip(names, weights, hg, strict=True)
        }
    finally:
        model.train(was_training)
        model.zero_grad(set_to_none=True)


def saliency_mask(
    scores: Mapping[str, torch.Tensor],
    densities: Mapping[str, float],
    slices: Mapping[str, int] | None = None,
) -> Mask:
    """Per unit, keep the ``round(d * numel)`` entries with the highest score."""
    slices = slices or {}
    units: dict[str, torch.Tensor] = {}
    for name, s in scores.items():
        parts = slices.get(name, 1)
        for i, rows in enumerate(unit_rows(name, s.shape, parts)):
            key = name if parts <= 1 else f"{name}#{i}"
            if key not in densities:
                raise MaskError(f"no density planned for {key!r}")
            part = s[rows]
            k = target_active_count(part.numel(), densities[key])
            flat = torch.nan_to_num(part.reshape(-1).float(), nan=-float("inf"))
            order = torch.argsort(flat, descending=True, stable=True)
            keep = torch.zeros(part.numel(), dtype=torch.bool)
            keep[order[:k]] = True
            units[key] = keep.view(part.shape)
    shapes = {n: s.shape for n, s in scores.items()}
    return join_units(units, shapes, slices)
