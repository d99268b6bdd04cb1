"""Client-level DP state in checkpoints: one shared implementation, the session-14 format."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from server.recorder import checkpoint_bytes, read_checkpoint
from server.runner import build_strategy
from strategies.aggregation.dp import DPSparseFedAvg
from strategies.aggregation.secagg_dp import SecAggDPSparseFedAvg
from tests.strategies.aggregation.test_secagg import CFG

DATA = Path(__file__).parent / "data"
# The run config the fixtures were written with (by the session-14 code, before the
# two copies of dp_state_dict became `strategies.aggregation.dp_state.DPStateMixin`).
DP = CFG.replace(
    privacy_mode="client",
    privacy_noise_multiplier=1.0,
    privacy_clip=2.0,
    privacy_adaptive_clip=True,
)
STATE = {"w": torch.arange(4.0)}
CASES = {
    "plain": (DP, DPSparseFedAvg),
    "secagg": (DP.replace(secure_mode="secagg"), SecAggDPSparseFedAvg),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_session_14_checkpoints_still_load_and_are_written_the_same(name: str) -> None:
    cfg, cls = CASES[name]
    old = (DATA / f"dp_checkpoint_{name}_session14.pt").read_bytes()
    ck = read_checkpoint(old, "fixture", STATE)
    assert ck["dp"] == {"dp_rounds": 3, "clip": 0.75}
    strategy: Any = build_strategy(cfg)
    assert isinstance(strategy, cls) and strategy.clipper is not None
    strategy.load_dp_state_dict(ck["dp"])
    assert strategy.dp_rounds == 3 and strategy.clipper.clip == 0.75
    if name == "secagg":  # the DP clip, not the secure sum's quantization clip
        assert strategy.dp_clip == 0.75 and strategy.clip == cfg.secure_clip
    else:
        assert strategy.clip == 0.75
    assert strategy.dp_state_dict() == {"dp_rounds": 3, "clip": 0.75}
    # the format is unchanged: the same state writes the same bytes as session 14's code
    assert checkpoint_bytes(3, STATE, strategy) == old


@pytest.mark.parametrize(
    ("state", "why"),
    [
        ({"clip": 1.0}, "dp_rounds"),
        ({"dp_rounds": -1, "clip": 1.0}, "dp_rounds"),
        ({"dp_rounds": True, "clip": 1.0}, "dp_rounds"),
        ({"dp_rounds": 2}, "clip"),
        ({"dp_rounds": 2, "clip": float("nan")}, "clip"),
        ({"dp_rounds": 2, "clip": 0.0}, "clip"),
        ({"dp_rounds": 2, "clip": "1"}, "clip"),
    ],
)
@pytest.mark.parametrize("name", sorted(CASES))
def test_a_malformed_dp_state_is_refused_in_one_line(
    name: str, state: dict[str, Any], why: str
) -> None:
    strategy: Any = build_strategy(CASES[name][0])
    before = strategy.dp_state_dict()
    with pytest.raises(ValueError, match=why) as err:
        strategy.load_dp_state_dict(state)
    assert "\n" not in str(err.value)
    assert strategy.dp_state_dict() == before  # nothing half-loaded
