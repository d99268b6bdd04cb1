"""Condensed local training: build the sub-network the server sent, train it, reply condensed.

The server (``strategies.aggregation.condensed``) sends, between mask rounds, only the
tensors of this node's sub-network and the kept unit indices. The client slices its own
freshly built model by those indices (``subnet.shrink_module``: Conv/Linear/BatchNorm
keep their classes, only smaller), loads the payload checked against the condensed spec,
trains the smaller network for real, and replies with the condensed tensors under the
mask it was sent. Also: the node's declared ``capacity`` (node config, 0 < c <= 1).
"""

from __future__ import annotations

import math

import torch
from flwr.app import ArrayRecord, RecordDict

from strategies import codec
from strategies.codec_units import decode_units
from strategies.sparse.masks import Mask
from strategies.sparse.subnet import shrink_module, slice_plan, wire_masked_keys
from strategies.sparse.units import unit_groups
from tasks.config import ConfigError, LeanfedConfig
from tasks.structure import layer_kinds

__all__ = ["CONDENSED_KEY", "UNITS_KEY", "node_capacity", "receive_condensed"]

CONDENSED_KEY = "leanfed.condensed"  # mirrors strategies.aggregation.condensed (no flwr import
UNITS_KEY = "leanfed.units"  # of the strategy package needed here)


def node_capacity(node_config: dict[str, bool | float | int | str]) -> float:
    """The node's compute budget ``capacity`` (node config; default 1): a float in (0, 1]."""
    raw = node_config.get("capacity", 1.0)
    if isinstance(raw, bool) or not isinstance(raw, int | float | str):
        raise ConfigError("node config capacity must be a number in (0, 1]")
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError("node config capacity must be a number in (0, 1]") from None
    if not math.isfinite(value) or not 0.0 < value <= 1.0:
        raise ConfigError(f"node config capacity = {value!r}: must be in (0, 1]")
    return value


def receive_condensed(
    content: RecordDict, cfg: LeanfedConfig, model: torch.nn.Module
) -> tuple[torch.nn.Module, Mask, list[str]]:
    """Shrink ``model`` to the sub-network in a train message's ``content`` and load its
    values (hostile input: unit indices and payload are checked against this model before
    anything is allocated).

    Returns (the condensed model, its mask over every DST-selected tensor, the keys whose
    mask goes on the wire).
    """
    config = content.config_records["config"]
    raw = config.get(UNITS_KEY)
    if not isinstance(raw, bytes):
        raise codec.CodecError("condensed message without unit indices")
    kinds = layer_kinds(model, cfg)
    groups = unit_groups(model)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    keep = decode_units(raw, {g.producer: g.units(int(shapes[g.producer][0])) for g in groups})
    shrink_module(model, slice_plan(groups, shapes, keep))
    on_wire = wire_masked_keys(kinds, groups)
    expected = codec.expected_spec(model.state_dict(), dict.fromkeys(on_wire))
    arrays: ArrayRecord = content.array_records["arrays"]
    payload = codec.from_arrayrecord(arrays, codec.max_payload_bytes(expected))
    values, small = codec.decode_with(payload, None, expected)
    model.load_state_dict(values)
    mask = {
        k: small[k] if k in small else torch.ones(values[k].shape, dtype=torch.bool) for k in kinds
    }
    return model, mask, on_wire
