"""DST rules for federated readjustment rounds, by name or plug-in: what scores regrowth.

A federated client readjusts its mask on FedDST rounds: magnitude drop, then regrow by a
score (``DSTController.regrow``). A DST rule is the score: a callable
``(model, x, y, names, **options) -> {name: score tensor}`` (an empty dict grows at random).
Built-ins: "set" (random growth, Mocanu et al. 2018), "rigl" (|dense gradient| on a
batch, Evci et al. 2020) and the structured "channel", "srigl", "nm" (the same gradient).
Plug-ins: ``dst.rule = "module:function"`` or an entry point of
``leanfed.dst_rules``; ``dst.options.*`` are its keyword arguments.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from strategies.plugins import Registry

__all__ = ["DST_RULES", "GrowScoreRule", "dense_grad_scores", "random_scores"]


# (model, x, y, names, **options) -> {name: score}; higher scores grow first.
GrowScoreRule = Callable[..., dict[str, torch.Tensor]]


def random_scores(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, names: list[str]
) -> dict[str, torch.Tensor]:
    """SET: no scores, so every layer regrows at random."""
    return {}


def dense_grad_scores(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, names: list[str]
) -> dict[str, torch.Tensor]:
    """|∂L/∂W| of the full weight tensors on one batch: RigL's grow score (Evci et al. 2020)."""
    params = dict(model.named_parameters())
    model.zero_grad(set_to_none=True)
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    scores: dict[str, torch.Tensor] = {}
    for n in names:
        grad = params[n].grad
        if grad is not None:
            scores[n] = grad.detach().abs().clone()
    model.zero_grad(set_to_none=True)
    return scores


DST_RULES: Registry[GrowScoreRule] = Registry("DST rule", "leanfed.dst_rules", "dst.rule")
DST_RULES.register("set", random_scores)
DST_RULES.register("rigl", dense_grad_scores)
# Structured rules grow whole units / rows by the same dense gradient (SRigL, Lasby et al.
# 2023); the engine reduces it per unit (``structured_rules``).
for _name in ("channel", "srigl", "nm"):
    DST_RULES.register(_name, dense_grad_scores)
