"""Condensed client training on the server: send each node its sub-network, scatter replies back.

Between mask rounds the consensus mask is fixed, so a node trains a physically smaller
network: ``CondensedSparseFedAvg`` sends it only the sub-network's tensors (the condensed
shapes of ``strategies.sparse.subnet``) and the kept unit indices (``codec_units``), and
decodes its reply against that condensed spec. On rounds where the server re-votes the
mask (``_mask_round``), nodes get the full masked model as in ``SparseFedAvg``, so they
can score inactive units with dense gradients (the structured DST readjustment).

Wire (train messages of condensed rounds; everything else as in ``strategy``):
  "arrays": ``codec`` payload of the condensed tensors; masks only on the layers that are not
            channel-structured (their columns already cut), always sent.
  "config": "leanfed.condensed" = 1, "leanfed.units" = ``codec_units.encode_units(keep)``.
  reply "arrays": ``codec`` payload of the condensed tensors under the mask sent
            (send_mask=False: a condensed client does not change its mask).
Download bytes = payload + unit bytes; upload bytes = the reply payload.

Merge: a reply is scattered to full shape (``subnet.expand_state``): masked tensors get
zeros outside the sub-network and a mask that keeps only what the node trained; per-unit
tensors (biases, BatchNorm) get a coverage mask after validation. Every mask-aware rule
then averages each coordinate over the nodes that trained it, so nodes of different
capacity (``subnet.choose_units``; the node reports its "capacity" metric, used from its
next round on) merge correctly.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from flwr.app import ArrayRecord, Message, MetricRecord

from strategies import codec
from strategies.aggregation.merge import ClientUpdate
from strategies.aggregation.strategy import Decoder, SparseFedAvg
from strategies.aggregation.wire import ReplyError, reply_payload
from strategies.codec_units import encode_units
from strategies.sparse.masks import Mask
from strategies.sparse.subnet import (
    Plan,
    choose_units,
    condense_mask,
    condense_state,
    coverage,
    expand_state,
    slice_plan,
    wire_masked_keys,
)
from strategies.sparse.units import UnitGroup, dead_rows

__all__ = ["CONDENSED_KEY", "UNITS_KEY", "CondensedSparseFedAvg", "NodeSubnet", "node_subnet"]

CONDENSED_KEY = "leanfed.condensed"
UNITS_KEY = "leanfed.units"


@dataclass(frozen=True)
class NodeSubnet:
    """What one node was sent in a condensed round (kept to decode and merge its reply)."""

    keep: dict[str, torch.Tensor]  # producer -> kept unit indices (sorted)
    plan: Plan
    small_mask: Mask  # condensed masks of the masked, non-channel layers (on the wire)
    spec: dict[str, codec.TensorSpec]  # condensed wire spec of the reply
    shapes: dict[str, tuple[int, ...]]  # full shapes


def node_subnet(
    groups: Sequence[UnitGroup],
    structure: dict[str, str],
    state: dict[str, torch.Tensor],
    mask: Mask,
    capacity: float = 1.0,
) -> NodeSubnet:
    """The sub-network of capacity ``capacity`` of the consensus (``subnet.choose_units``)."""
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    keep = choose_units(groups, mask, state, capacity)
    plan = slice_plan(groups, shapes, keep)
    small = condense_mask(mask, plan)
    wired = set(wire_masked_keys({k: structure.get(k, "none") for k in mask}, groups))
    on_wire = {k: m for k, m in small.items() if k in wired}
    for k, m in small.items():
        if k not in on_wire and not bool(m.all()):
            raise ValueError(f"{k!r}: channel layer has a partially active kept unit")
    spec = {
        k: codec.TensorSpec(_small_shape(shapes[k], plan.get(k)), v.dtype, k in on_wire)
        for k, v in state.items()
    }
    return NodeSubnet(keep, plan, on_wire, spec, shapes)


def _small_shape(
    shape: tuple[int, ...], rc: tuple[torch.Tensor | None, torch.Tensor | None] | None
) -> tuple[int, ...]:
    if rc is None:
        return shape
    r, c = rc
    out = list(shape)
    if r is not None:
        out[0] = len(r)
    if c is not None:
        out[1] = len(c)
    return tuple(out)


class CondensedSparseFedAvg(SparseFedAvg):
    """SparseFedAvg whose nodes train their condensed sub-network between mask rounds."""

    def __init__(self, *, unit_groups: Sequence[UnitGroup] = (), **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.unit_groups: list[UnitGroup] = list(unit_groups)
        self.capacity: dict[int, float] = {}  # node -> its last reported capacity
        self._subnets: dict[int, NodeSubnet] = {}

    def condensed_round(self, server_round: int) -> bool:
        """Nodes train condensed unless the server re-votes the mask after this round."""
        return bool(self.unit_groups) and not self._mask_round(server_round)

    def _node_payload(
        self, kind: str, server_round: int, node: int, state: dict[str, torch.Tensor], mask: Mask
    ) -> tuple[ArrayRecord, int, dict[str, Any]] | None:
        if kind != "train":
            return None
        if not self.condensed_round(server_round):
            self._subnets.pop(node, None)
            return None
        sub = node_subnet(
            self.unit_groups, self.structure, state, mask, self.capacity.get(node, 1.0)
        )
        self._subnets[node] = sub
        masked = {k: torch.where(m, state[k], torch.zeros_like(state[k])) for k, m in mask.items()}
        small = condense_state({**state, **masked}, sub.plan)
        payload = codec.encode(
            small, sub.small_mask, value_dtype=self.download_dtype, send_mask=True
        )
        units = encode_units(sub.keep)
        extra = {CONDENSED_KEY: 1, UNITS_KEY: units}
        return codec.to_arrayrecord(payload), len(payload) + len(units), extra

    def _decoder(self, mask: Mask, wire_spec: dict[str, codec.TensorSpec]) -> Decoder:
        default = super()._decoder(mask, wire_spec)
        previous = self._global or {}

        def decode(msg: Message) -> tuple[dict[str, torch.Tensor], Mask]:
            sub = self._subnets.get(int(msg.metadata.src_node_id))
            if sub is None:
                return default(msg)
            data = reply_payload(msg, codec.max_payload_bytes(sub.spec))
            values, small_mask = codec.decode_with(data, sub.small_mask, sub.spec)
            return scatter_reply(sub, values, small_mask, mask, previous)

        return decode

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """SparseFedAvg's round, then the shift tensors (bias, BN beta/mean) of dead units set
        to 0: the global model then computes what the condensed sub-networks compute."""
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is None or self.mask is None or not self.unit_groups:
            return arrays, metrics
        state = dict(arrays.to_torch_state_dict())
        for g in self.unit_groups:
            dead = dead_rows(self.mask, g)
            if dead.numel() and bool(dead.any()):
                for name in g.shift:
                    state[name] = state[name].masked_fill(dead, 0)
        return ArrayRecord(state), metrics

    def _prepare(self, accepted: list[ClientUpdate]) -> list[ClientUpdate]:
        for u in accepted:
            cap = u.metrics.get("capacity")
            if isinstance(cap, int | float) and 0.0 < cap <= 1.0:
                self.capacity[u.node_id] = float(cap)
            sub = self._subnets.get(u.node_id)
            if sub is None:
                continue
            cover = coverage(sub.plan, sub.shapes)
            for k, c in cover.items():  # per-unit tensors: only the units this node trained
                if k not in u.mask:
                    u.mask[k] = c
        self._subnets = {}
        return accepted


def scatter_reply(
    sub: NodeSubnet,
    values: dict[str, torch.Tensor],
    small_mask: Mask,
    mask: Mask,
    previous: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], Mask]:
    """Full-shape (values, mask) of a condensed reply: masked tensors zero outside what the
    node trained (its mask: the sub-network's part of the consensus), others from
    ``previous`` there (a coverage mask is added after validation, ``_prepare``)."""
    if set(values) != set(sub.spec):
        raise ReplyError("condensed reply does not hold the sub-network's tensors")
    template = {k: torch.zeros_like(v) if k in mask else v for k, v in previous.items()}
    full = expand_state(values, sub.plan, sub.shapes, template)
    small_full = {
        k: small_mask[k] if k in small_mask else torch.ones(sub.spec[k].shape, dtype=torch.bool)
        for k in mask
    }
    bool_tpl = {k: torch.zeros(sub.shapes[k], dtype=torch.bool) for k in mask}
    full_mask = expand_state(small_full, sub.plan, sub.shapes, bool_tpl)
    return full, full_mask
