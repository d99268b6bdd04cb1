"""Client side of condensed training: the node's capacity and the hostile sub-network message."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from client.condensed import UNITS_KEY, node_capacity, receive_condensed
from strategies.codec_masks import CodecError
from strategies.codec_units import encode_units
from tasks.config import ConfigError, LeanfedConfig
from tasks.models import SmallCNN


@pytest.mark.parametrize(("raw", "want"), [(None, 1.0), (0.25, 0.25), (1, 1.0), ("0.5", 0.5)])
def test_capacity_from_node_config(raw: object, want: float) -> None:
    cfg = {} if raw is None else {"capacity": raw}
    assert node_capacity(cfg) == want  # type: ignore[arg-type]


@pytest.mark.parametrize("raw", [0, 0.0, -1, 1.5, float("nan"), float("inf"), "x", True])
def test_bad_capacity_is_one_line_config_error(raw: object) -> None:
    with pytest.raises(ConfigError, match="capacity"):
        node_capacity({"capacity": raw})  # type: ignore[dict-item]


def _msg(units: object) -> RecordDict:
    cfg = ConfigRecord({"server-round": 1, "leanfed.condensed": 1})
    if units is not None:
        cfg[UNITS_KEY] = units  # type: ignore[assignment]
    return RecordDict({"arrays": ArrayRecord(), "config": cfg})


def test_hostile_unit_indices_fail_before_the_model_changes() -> None:
    cfg = LeanfedConfig(model="cnn", dataset="digits", dst_rule="channel")
    model = SmallCNN((1, 8, 8), 10)
    with pytest.raises(CodecError, match="without unit indices"):
        receive_condensed(_msg(None), cfg, model)
    bad = encode_units(
        {
            "conv1.weight": torch.tensor([99]),
            "conv2.weight": torch.tensor([0]),
            "fc1.weight": torch.tensor([0]),
        }
    )
    with pytest.raises(CodecError, match="out of range"):
        receive_condensed(_msg(bad), cfg, model)
    assert model.conv1.out_channels == 16  # untouched
