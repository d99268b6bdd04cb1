"""Per-layer DST structure of a run's model (in tasks/: server and client must agree on it)."""

from __future__ import annotations

import torch
from torch import nn

from strategies.sparse.selection import Selection, parse_patterns, select_sparsifiable
from strategies.sparse.structured_rules import layer_structures
from strategies.sparse.units import unit_groups, unit_row_index
from tasks.config import STRUCTURED_RULES, LeanfedConfig

__all__ = ["layer_kinds", "run_selection", "unit_rows"]


def run_selection(model: nn.Module, cfg: LeanfedConfig) -> Selection:
    """The tensors this run's DST masks: the clients' engine selection (``dst.exclude`` applied;
    tied weights once, fused in_proj as q/k/v slices). The server's masks use it too."""
    return select_sparsifiable(model, exclude=parse_patterns(cfg.dst_exclude))


def layer_kinds(model: nn.Module, cfg: LeanfedConfig) -> dict[str, str]:
    """{masked key: "channel" | "fanin" | "nm"} under a structured ``dst.rule``, else {}.

    The keys are the client's DST selection (``dst.exclude`` applied), the kinds the
    engine's (``layer_structures``): the server's initial mask, its consensus vote and the
    clients' prune/grow then keep the same structure on every layer.
    """
    if cfg.dst_rule not in STRUCTURED_RULES:
        return {}
    sel = run_selection(model, cfg)
    producers = {g.producer for g in unit_groups(model)}
    return layer_structures(cfg.dst_rule, sel.shapes, producers)


def unit_rows(model: nn.Module, cfg: LeanfedConfig) -> dict[str, torch.Tensor]:
    """{channel producer: [units, rows of a unit]} where a unit is several rows (attention
    heads: head_dim rows in each of q, k, v), so the server's mask keeps whole heads."""
    kinds = layer_kinds(model, cfg)
    state = model.state_dict()
    return {
        g.producer: unit_row_index(g, int(state[g.producer].shape[0]))
        for g in unit_groups(model)
        if kinds.get(g.producer) == "channel" and (g.rows_per_unit, g.blocks) != (1, 1)
    }
