"""The continual ClientApp path on a tiny Split-digits stream through the in-process Grid."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import RecordDict

import client.streams as streams
from client.app import app as client_app
from client.continual import (
    REPLAY_KEY,
    STATE_KEY,
    client_stream,
    load_state,
    register_scenario_builder,
    replay_share,
    save_state,
)
from server.recorder import StoreRecorder
from server.runner import RunSummary, run_federated
from server.store import RunStore
from simulations.grid import InProcessGrid
from strategies.aggregation.strategy import SparseFedAvg
from strategies.continual.drift import DriftMonitor, DriftSignal
from tasks.config import ConfigError, LeanfedConfig
from tasks.scenarios import Scenario, make_scenario
from tasks.stream import Experience, write_experience_file

K, RPT, DELAY, CAP = 3, 2, 1, 40

TINY = LeanfedConfig(
    num_server_rounds=5 * RPT + DELAY,  # the last client reaches the last task too
    dataset="digits",
    model="mlp",
    num_partitions=K,
    fraction_train=1.0,
    min_train_nodes=K,
    local_steps=3,
    local_batch_size=16,
    dst_density=0.3,
    dst_end_round_fraction=1.0,
    seed=3,
    cl_scenario="split-mnist",
    cl_rounds_per_task=RPT,
    cl_async_max_delay=DELAY,
    cl_replay_capacity=CAP,
    cl_freeze_fraction=0.2,
    cl_drift_detector="none",
)


@pytest.fixture(scope="module", autouse=True)
def _builder():  # type: ignore[no-untyped-def]
    register_scenario_builder(make_scenario)
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny batches: extra threads only add contention
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def scenario() -> Scenario:
    return make_scenario(
        "split-mnist", K, TINY.seed, rounds_per_task=RPT, async_max_delay=DELAY, dataset="digits"
    )


@pytest.fixture(scope="module")
def run(scenario: Scenario) -> tuple[InProcessGrid, RunSummary, SparseFedAvg]:
    grid = InProcessGrid(client_app, K, run_config=TINY.to_run_config())
    tests = [(scenario.test_set(t).x, scenario.test_set(t).y) for t in range(scenario.num_tasks)]
    captured: dict[str, SparseFedAvg] = {}

    def keep(rec: object, strategy: object, arrays: object) -> None:
        assert isinstance(strategy, SparseFedAvg)
        captured["s"] = strategy

    summary = run_federated(grid, TINY, task_tests=tests, on_round=keep)
    return grid, summary, captured["s"]


def test_task_switches_reported_at_each_clients_async_boundary(run, scenario) -> None:
    grid, summary, strategy = run
    assert len(np.unique(scenario.boundaries[:, 1:])) > 4  # the delays really differ
    for rnd in range(1, TINY.num_server_rounds + 1):
        rows = strategy.round_clients[rnd]
        assert len(rows) == K and all(r["accepted"] for r in rows)
        for r in rows:
            pid = grid.partition_of(int(r["node_id"]))  # type: ignore[arg-type]
            b = [int(v) for v in scenario.boundaries[pid]]
            m = r["metrics"]
            assert m["task_id"] == sum(1 for v in b if v <= rnd) - 1
            assert m["task_switch"] == int(rnd in b[1:])
            # Every key on every client (FedAvg's metric aggregation needs the same keys).
            keys = {"drift", "task_switch", "task_id", "regrew", "replay_size", "train_flops"}
            assert keys <= set(m)  # type: ignore[arg-type]
            assert m["drift"] == 0  # detector "none"
            if m["task_switch"]:
                assert m["regrew"] == 1  # a boundary always buys a regrowth


def test_per_task_accuracies_each_round(run, scenario) -> None:
    _, summary, _ = run
    assert len(summary.initial_task_accuracies) == scenario.num_tasks
    for r in summary.rounds:
        assert len(r.task_accuracies) == scenario.num_tasks
        assert all(0.0 <= a <= 1.0 for a in r.task_accuracies)
    assert summary.rounds[-1].task_accuracies != summary.rounds[0].task_accuracies


def test_state_survives_rounds_and_replay_is_bounded(run, scenario) -> None:
    grid, _, _ = run
    for nid in grid.node_ids:
        pid = grid.partition_of(nid)
        state = grid.contexts[nid].state
        rec = state.config_records[STATE_KEY]
        assert rec["stream.position"] == scenario.num_tasks - 1
        assert rec["drift.steps"] == TINY.num_server_rounds * TINY.local_steps
        # The reservoir was offered every finished experience exactly once, holds <= CAP.
        finished = sum(len(scenario.client_indices[pid][t]) for t in range(scenario.num_tasks - 1))
        assert rec["replay.seen"] == finished
        x = state.array_records[REPLAY_KEY]["x"].numpy()
        assert x.shape == (CAP, 1, 8, 8)
        # Protection grew once per crossed boundary and round-trips through context.state.
        data = client_stream(TINY, dict(grid.contexts[nid].node_config))
        cl = load_state(state, TINY, data.stream, 0)
        assert cl.protection is not None and cl.protection.experiences == scenario.num_tasks - 1
        assert cl.protection.frozen_count() > 0 and len(cl.replay) == CAP
        copy = RecordDict()
        save_state(copy, data.stream, cl)
        again = load_state(copy, TINY, client_stream(TINY, {"partition-id": pid}).stream, 0)
        assert again.protection is not None
        for n, f in cl.protection.frozen.items():
            assert torch.equal(again.protection.frozen[n], f)
            assert torch.equal(again.protection.anchor[n][f], cl.protection.anchor[n][f])


def test_frozen_weights_stay_in_the_global_mask(run) -> None:
    grid, summary, strategy = run
    assert strategy.mask is not None and summary.final_state is not None
    nid = grid.node_ids[0]
    data = client_stream(TINY, dict(grid.contexts[nid].node_config))
    cl = load_state(grid.contexts[nid].state, TINY, data.stream, 0)
    assert cl.protection is not None
    assert cl.protection.frozen_outside(strategy.mask) <= cl.protection.frozen_count() // 10


def test_drift_flag_regrows_sends_mask_and_is_recorded(monkeypatch, tmp_path: Path) -> None:
    fire_at = {2}  # the monitor's 2nd update in each round signals drift

    def update(self: DriftMonitor, loss: float, error: bool) -> DriftSignal | None:
        self.steps += 1
        if (self.steps - 1) % TINY.local_steps + 1 in fire_at:
            return DriftSignal(kind="drift", step=self.steps, source="adwin")
        return None

    monkeypatch.setattr(DriftMonitor, "update", update)
    cfg = TINY.replace(num_server_rounds=3, cl_async_max_delay=0, dst_end_round_fraction=0.1)
    grid = InProcessGrid(client_app, K, run_config=cfg.to_run_config())
    with RunStore(f"sqlite:///{tmp_path / 'runs.db'}") as store:
        run_id = store.create_run(cfg.to_run_config(), seed=cfg.seed)
        recorder = StoreRecorder(store, run_id)
        holder: dict[str, SparseFedAvg] = {}

        def on_round(rec, strategy, arrays) -> None:  # type: ignore[no-untyped-def]
            holder["s"] = strategy
            recorder(rec, strategy, arrays)

        run_federated(grid, cfg, on_round=on_round)
        strategy = holder["s"]
        for rnd in (1, 2, 3):
            for row in strategy.round_clients[rnd]:
                m = row["metrics"]
                assert m["drift"] == 1 and m["regrew"] == 1  # type: ignore[index]
        # No scheduled readjustment after round 1 (end fraction 0.1): drift alone changed
        # the client masks, the server re-voted and its consensus moved.
        assert strategy.mask_version >= 2
        drift = store.get_events(run_id, kind="drift")
        assert len(drift) == 3 * K
        switches = store.get_events(run_id, kind="task_switch")
        assert [e.round for e in switches] == [3] * K  # RPT = 2: task 1 starts in round 3
        assert all(e.detail["task_id"] == 1 for e in switches)


def test_replay_share_is_balanced_over_experiences() -> None:
    assert replay_share(32, 0) == 0
    assert replay_share(32, 1) == 16
    assert replay_share(32, 4) == 26  # 4 old experiences ~ 4/5 of the batch
    assert replay_share(2, 9) == 1  # at least one new example per batch


def test_deployed_client_reads_its_file_stream(tmp_path: Path) -> None:
    for t in range(3):
        x = torch.rand(5, 1, 8, 8)
        exp = Experience(t, x, torch.full((5,), t), (t,))
        write_experience_file(tmp_path / f"exp_{t:03d}.npz", exp)
    data = client_stream(TINY, {"stream-dir": str(tmp_path)})
    assert data.stream.boundaries == (1, 3, 5)  # every cl.rounds-per-task rounds
    assert data.input_shape == (1, 8, 8) and data.num_classes == 10
    custom = client_stream(
        TINY, {"stream-dir": str(tmp_path), "stream-boundaries": "1,2,9", "num-classes": 3}
    )
    assert custom.stream.boundaries == (1, 2, 9) and custom.num_classes == 3


def test_shipped_scenarios_are_the_default_builder(monkeypatch) -> None:
    # flwr run / leanfed simulate register nothing: the ClientApp falls back to the
    # scenarios shipped in tasks/scenarios.py.
    monkeypatch.setattr(streams, "_builder", [])
    streams._scenario.cache_clear()
    stream = client_stream(TINY.replace(seed=99), {"partition-id": 0, "num-partitions": K})
    assert stream is not None
    streams._scenario.cache_clear()


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"cl_scenario": "split-cifar"}, "cl.scenario"),
        ({"cl_async_max_delay": 2}, "cl.async-max-delay"),
        ({"cl_rounds_per_task": 0}, "cl.rounds-per-task"),
        ({"cl_drift_detector": "kswin"}, "cl.drift-detector"),
        ({"cl_drift_min_gap": 0}, "cl.drift-min-gap"),
        ({"cl_regrow_task_fraction": 1.5}, "cl.regrow-task-fraction"),
        ({"cl_freeze_fraction": 1.0}, "cl.freeze-fraction"),
    ],
)
def test_bad_cl_config_names_the_key(change: dict[str, object], key: str) -> None:
    values = dataclasses.replace(TINY, **change).to_run_config()  # not validated yet
    with pytest.raises(ConfigError, match=key):
        LeanfedConfig.from_run_config(values)
