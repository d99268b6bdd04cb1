"""A site's own DP floor (node config dp-min-noise-multiplier) refuses runs with less noise."""

from __future__ import annotations

import math

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from client.app import app as client_app
from client.secagg import MIN_NOISE_KEY, check_noise_floor
from strategies.secure.crypto import SecAggError
from tasks.config import LeanfedConfig

BASE = LeanfedConfig(dataset="digits", model="mlp", num_partitions=2, seed=0)
RECORD = BASE.replace(privacy_mode="record", privacy_noise_multiplier=1.0)
SECAGG_DP = BASE.replace(
    privacy_mode="client", secure_mode="secagg", privacy_noise_multiplier=1.0
)
CENTRAL_DP = BASE.replace(privacy_mode="client", privacy_noise_multiplier=5.0)


@pytest.mark.parametrize(
    ("cfg", "floor", "refused"),
    [
        (BASE, None, None),  # no floor: nothing is checked
        (BASE, 0.0, None),  # a zero floor asks for nothing
        (BASE, 0.5, "adds no DP noise"),
        (CENTRAL_DP, 0.5, "added by the server"),  # z = 5 but the update leaves in clear
        (RECORD, 1.0, None),  # z = floor: accepted
        (RECORD, 1.5, "below this site's"),
        (SECAGG_DP, 0.5, None),
        (SECAGG_DP, 2, "below this site's"),  # an int floor from --node-config
    ],
)
def test_a_site_refuses_runs_below_its_noise_floor(
    cfg: LeanfedConfig, floor: float | None, refused: str | None
) -> None:
    node = {} if floor is None else {MIN_NOISE_KEY: floor}
    if refused is None:
        check_noise_floor(cfg, node)
    else:
        with pytest.raises(SecAggError, match=refused):
            check_noise_floor(cfg, node)


@pytest.mark.parametrize("bad", [True, "1.0", math.nan, math.inf, -1.0])
def test_a_malformed_floor_is_refused_in_one_line(bad: object) -> None:
    with pytest.raises(SecAggError, match=f"{MIN_NOISE_KEY} must be a finite number >= 0"):
        check_noise_floor(RECORD, {MIN_NOISE_KEY: bad})


@pytest.mark.parametrize("message_type", ["train", "evaluate"])
def test_the_client_app_refuses_before_touching_the_message(message_type: str) -> None:
    # The message carries no model at all: had the app gone past the floor check, it would
    # fail on the missing arrays with another error.
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1  # as a SuperNode
    msg = Message(
        RecordDict({"config": ConfigRecord({"server-round": 1})}),
        dst_node_id=1,
        message_type=message_type,
    )
    ctx = Context(
        run_id=1,
        node_id=1,
        node_config={"partition-id": 0, "num-partitions": 2, MIN_NOISE_KEY: 0.5},
        state=RecordDict(),
        run_config=BASE.to_run_config(),
    )
    with pytest.raises(SecAggError, match="adds no DP noise"):
        client_app(msg, ctx)
