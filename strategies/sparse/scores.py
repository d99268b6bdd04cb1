"""Scores for prune/grow, kept separate from selection (sparsimony / RigL split).

Drop rules remove the active entries with the LOWEST score, grow rules activate the inactive
entries with the HIGHEST score, so a new criterion (e.g. Taylor |w * g|, SNIP) is one more
score function here and needs no change to ``prune_grow``.
"""

from __future__ import annotations

import torch

__all__ = [
    "channel_gradient_score",
    "channel_l2_score",
    "gradient_score",
    "magnitude_score",
    "random_score",
    "taylor_score",
]


def magnitude_score(weight: torch.Tensor) -> torch.Tensor:
    """|w|: magnitude pruning (Han et al. 2015; RigL and SET drop criterion)."""
    return weight.detach().abs()


def gradient_score(grad: torch.Tensor) -> torch.Tensor:
    """|dL/dw| of the DENSE gradient: RigL's grow criterion (Evci et al. 2020)."""
    return grad.detach().abs()


def random_score(
    shape: torch.Size | tuple[int, ...], generator: torch.Generator | None = None
) -> torch.Tensor:
    """U[0, 1) scores: SET's random regrowth (Mocanu et al. 2018), reproducible via generator."""
    return torch.rand(tuple(shape), generator=generator)


def taylor_score(weight: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """|w * g|: first-order Taylor saliency (Molchanov et al. 2017)."""
    return (weight.detach() * grad.detach()).abs()


def channel_l2_score(weight: torch.Tensor) -> torch.Tensor:
    """[units] L2 norm of every output unit's weights (filter-norm pruning, Li et al. 2017)."""
    w = weight.detach().float()
    return w.reshape(w.shape[0], -1).norm(dim=1)


def channel_gradient_score(grad: torch.Tensor) -> torch.Tensor:
    """[units] L2 norm of every unit's dense gradient: RigL's grow criterion per unit."""
    return channel_l2_score(grad)
