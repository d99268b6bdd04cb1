"""Structured drop/grow rules in the ``prune_grow`` registry (channel, constant fan-in, N:M).

One drop rule and two grow rules dispatch on ``LayerState.structure`` so that one DST rule can
mix structures across layers (channel units where the model declares unit groups, constant
fan-in elsewhere): ``structured-magnitude`` drops by channel L2 norm / per-row |w| / per-group
|w|; ``structured-gradient`` grows by channel gradient norm / per-row |dense grad| (SRigL,
Lasby et al. 2023) / per-group |grad|; ``structured-random`` grows at random (no gradient).
Importing this module registers them.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping

import torch

from strategies.sparse.prune_grow import LayerState, register_drop_rule, register_grow_rule
from strategies.sparse.scores import (
    channel_gradient_score,
    channel_l2_score,
    gradient_score,
    magnitude_score,
    random_score,
)
from strategies.sparse.structured import (
    NM,
    channel_drop,
    channel_grow,
    fanin_drop,
    grow_per_segment,
    nm_drop,
)

__all__ = [
    "STRUCTURES",
    "layer_structures",
    "structured_drop",
    "structured_gradient_grow",
    "structured_random_grow",
]

STRUCTURES = ("channel", "fanin", "nm")
_STRUCTURED_RULES = ("channel", "srigl", "nm")


def layer_structures(
    rule: str, shapes: Mapping[str, torch.Size | tuple[int, ...]], producers: Collection[str]
) -> dict[str, str]:
    """Per tensor: "channel" for declared unit producers under the channel rule, "nm" where
    the tensor splits into groups of M under the nm rule, else "fanin"; "none" for every
    tensor under an unstructured rule. The engine, the server's initial mask and the
    consensus vote all read this one map, so client and server agree on every layer."""
    if rule not in _STRUCTURED_RULES:
        return {n: "none" for n in shapes}
    out = {}
    for n, shape in shapes.items():
        kind = "fanin"
        if rule == "channel" and n in producers:
            kind = "channel"
        elif rule == "nm" and math.prod(shape) % NM[1] == 0:
            kind = "nm"
        out[n] = kind
    return out


def _kind(layer: LayerState) -> str:
    if layer.structure not in STRUCTURES:
        raise ValueError(f"{layer.name}: structured rule on structure {layer.structure!r}")
    return layer.structure


def structured_drop(layer: LayerState, n: int) -> torch.Tensor:
    """Drop about ``n`` entries keeping the layer's structure (exact count: the returned set)."""
    kind = _kind(layer)
    if kind == "channel":
        return channel_drop(layer.mask, channel_l2_score(layer.weight), n)
    if kind == "fanin":
        return fanin_drop(layer.mask, magnitude_score(layer.weight), n)
    return nm_drop(layer.mask, magnitude_score(layer.weight), n, NM[1])


def _grow(
    layer: LayerState,
    after: torch.Tensor,
    forbidden: torch.Tensor,
    score: torch.Tensor,
    unit_score: torch.Tensor,
) -> torch.Tensor:
    kind = _kind(layer)
    if kind == "channel":
        return channel_grow(after, unit_score, forbidden)
    seg = NM[1] if kind == "nm" else after[0].numel() if after.dim() > 1 else after.numel()
    return grow_per_segment(after, score, forbidden, seg)


def structured_gradient_grow(
    layer: LayerState, mask_after_drop: torch.Tensor, forbidden: torch.Tensor, n: int
) -> torch.Tensor:
    """Regrow what the drop removed (``n`` is implied by ``forbidden``) by |dense gradient|."""
    if layer.dense_grad is None:
        raise ValueError(f"{layer.name}: gradient grow needs the dense gradient")
    g = layer.dense_grad
    return _grow(layer, mask_after_drop, forbidden, gradient_score(g), channel_gradient_score(g))


def structured_random_grow(
    layer: LayerState, mask_after_drop: torch.Tensor, forbidden: torch.Tensor, n: int
) -> torch.Tensor:
    """Regrow what the drop removed at random (SET-style, reproducible via the generator)."""
    s = random_score(layer.mask.shape, layer.generator).to(layer.mask.device)
    return _grow(layer, mask_after_drop, forbidden, s, s.reshape(s.shape[0], -1).mean(1))


register_drop_rule("structured-magnitude", structured_drop)
register_grow_rule("structured-gradient", structured_gradient_grow)
register_grow_rule("structured-random", structured_random_grow)
