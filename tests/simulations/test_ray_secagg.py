"""SecAgg+ on Flower's simulation engine (Ray backend): the stage queries run in Ray actors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from client.app import app as client_app
from server.runner import run_federated
from server.store import RunStore
from simulations.grid import InProcessGrid, quiet_flower
from simulations.ray_engine import run_on_ray
from strategies.secure.ring import error_bound
from tasks.config import LeanfedConfig

# Full-batch local steps (batch >= every partition) and a static mask: a client's update
# depends only on its partition, not on the random node id Flower's engine gives it, so
# the in-process plaintext run trains the very same updates.
PLAIN = LeanfedConfig(
    num_server_rounds=1,
    dataset="digits",
    model="mlp",
    num_partitions=3,
    fraction_train=1.0,
    min_train_nodes=3,
    fraction_evaluate=0.0,
    local_steps=2,
    local_batch_size=1024,
    dst_rule="static",
    dst_density=0.2,
    seed=4,
)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_secagg_round_on_the_ray_engine_equals_plaintext(tmp_path: Path) -> None:
    quiet_flower()
    cfg = PLAIN.replace(secure_mode="secagg")
    with RunStore(f"sqlite:///{tmp_path / 'runs.db'}") as store:
        _, secure = run_on_ray(cfg, store, num_cpus=2)
        (run,) = store.list_runs()
        rows = store.get_client_results(run.id, 1)
    metrics = secure.rounds[0].metrics
    assert metrics["secagg_aborted"] == 0 and metrics["num_accepted"] == 3
    assert sorted(r.accepted for r in rows) == [True, True, True]
    grid = InProcessGrid(client_app, 3, run_config=PLAIN.to_run_config())
    held: dict[str, Any] = {}
    plain = run_federated(grid, PLAIN, on_round=lambda rec, s, a: held.setdefault("s", s))
    assert secure.final_state is not None and plain.final_state is not None
    bound = error_bound(cfg.secure_clip, cfg.secure_quant_bits)
    moved = 0.0
    for k, v in plain.final_state.items():
        assert torch.max(torch.abs(secure.final_state[k] - v)) <= bound + 1e-5, k
        moved = max(moved, float(torch.max(torch.abs(v - held["s"]._global[k]))))
    assert moved > 100 * bound  # the round changed the model far beyond the tolerance
