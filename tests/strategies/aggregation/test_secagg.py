"""SecAgg+ end to end: the real ClientApp on the in-process Grid, every reply to the server kept."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import Context, Message, RecordDict

from client.app import app as client_app
from server.app import app as server_app
from server.runner import RunSummary, run_federated
from server.store import RunStore
from simulations.grid import DropoutGrid, quiet_flower
from strategies.aggregation.merge import ClientUpdate, masked_weighted_mean
from strategies.aggregation.secagg import SecAggSparseFedAvg
from strategies.aggregation.wire import decode_reply
from strategies.secure.ring import error_bound
from strategies.secure.sparse_sum import SparseSumPlan
from tasks.config import ConfigError, LeanfedConfig

CFG = LeanfedConfig(
    num_server_rounds=1,
    dataset="digits",
    model="mlp",
    num_partitions=5,
    fraction_train=1.0,
    min_train_nodes=5,
    local_steps=3,
    local_batch_size=16,
    dst_rule="static",
    dst_density=0.2,
    seed=2,
)
BOUND = error_bound(CFG.secure_clip, CFG.secure_quant_bits)


def _run(cfg: LeanfedConfig, drop: int = 0) -> tuple[DropoutGrid, Any, RunSummary]:
    """One round; the train replies (masked inputs) of `drop` nodes are lost after key sharing."""
    quiet_flower()
    n = cfg.num_partitions
    grid = DropoutGrid(client_app, n, run_config=cfg.to_run_config(), record=True)
    grid.drop_nodes = set(grid.node_ids[:drop])
    held: dict[str, Any] = {}
    summary = run_federated(grid, cfg, on_round=lambda rec, s, a: held.setdefault("s", s))
    return grid, held["s"], summary


@pytest.fixture(scope="module")
def plain() -> tuple[DropoutGrid, Any, RunSummary]:
    return _run(CFG)


@pytest.fixture(scope="module")
def secure() -> tuple[DropoutGrid, Any, RunSummary]:
    return _run(CFG.replace(secure_mode="secagg"))


def _updates(plain: tuple[DropoutGrid, Any, RunSummary], keep: set[int]) -> list[ClientUpdate]:
    grid, strategy, _ = plain
    train = [m for m in grid.received if m.metadata.message_type == "train"]
    return [decode_reply(m, strategy.mask) for m in train if m.metadata.src_node_id in keep]


def _expected(
    plain: tuple[DropoutGrid, Any, RunSummary], keep: set[int]
) -> dict[str, torch.Tensor]:
    _, strategy, _ = plain
    g, mask = strategy._global, strategy.mask
    on_m = [
        ClientUpdate(u.node_id, u.values, {k: u.mask[k] & mask[k] for k in mask}, u.num_examples)
        for u in _updates(plain, keep)
    ]
    merged = masked_weighted_mean(on_m, g)
    return {k: torch.where(mask[k], v, 0.0) if k in mask else v for k, v in merged.items()}


def _assert_close(summary: RunSummary, expected: dict[str, torch.Tensor]) -> None:
    assert summary.final_state is not None
    for k, v in expected.items():
        assert torch.max(torch.abs(summary.final_state[k] - v)) <= BOUND + 1e-6, k


def test_secure_round_equals_plaintext_mean_within_quantization_error(plain, secure) -> None:
    grid, strategy, summary = secure
    assert isinstance(strategy, SecAggSparseFedAvg)
    assert summary.rounds[0].metrics["secagg_aborted"] == 0
    assert summary.rounds[0].metrics["num_accepted"] == 5
    _assert_close(summary, _expected(plain, set(grid.node_ids)))
    # the plaintext strategy's own round agrees too (it is the same masked mean)
    _assert_close(plain[2], _expected(plain, set(grid.node_ids)))


def _payloads(msg: Message) -> list[bytes]:
    out: list[bytes] = []
    for rec in msg.content.config_records.values():
        for v in rec.values():
            out += (
                [v]
                if isinstance(v, bytes)
                else [x for x in v if isinstance(x, bytes)]
                if (isinstance(v, list))
                else []
            )
    return out


def test_no_reply_the_server_receives_decodes_to_a_client_plaintext(plain, secure) -> None:
    grid, strategy, _ = secure
    assert grid.received and {m.metadata.message_type for m in grid.received} >= {
        "query.secagg_advertise",
        "query.secagg_share",
        "train",
        "query.secagg_unmask",
    }
    for msg in grid.received:  # no model arrays, no metrics: only key material and masked vectors
        assert not msg.content.array_records and not msg.content.metric_records
    _, pstrat, _ = plain
    g, mask = pstrat._global, pstrat.mask
    floats = {k: tuple(v.shape) for k, v in g.items()}
    plan = SparseSumPlan(
        floats, mask, False, CFG.secure_clip, CFG.secure_quant_bits, CFG.secure_max_weight, 5
    )
    layout = plan.layout()
    payloads = [p for m in grid.received for p in _payloads(m)]
    assert sum(len(p) == layout.packed_bytes for p in payloads) == 5
    for u in _updates(plain, set(grid.node_ids)):
        x = layout.split(plan.encode(g, u.values, u.mask, u.num_examples, 0.0))["values"]
        raw = np.concatenate([u.values[k][mask[k]].numpy() for k in sorted(mask)]).tobytes()
        for p in payloads:
            assert raw[:32] not in p  # the client's float values appear nowhere
            if len(p) == layout.packed_bytes:  # as the sum layout: not this client's vector
                y = layout.split(layout.unpack(p))["values"]
                assert np.mean(y == x) < 0.01


@pytest.mark.parametrize("drop", [2])
def test_dropouts_up_to_n_minus_t_after_key_sharing_complete_the_round(plain, drop: int) -> None:
    # 5 nodes, complete graph: t = floor(0.5 * 5) + 1 = 3, so n - t = 2 may drop.
    grid, strategy, summary = _run(CFG.replace(secure_mode="secagg"), drop)
    metrics = summary.rounds[0].metrics
    assert metrics["secagg_aborted"] == 0 and metrics["num_accepted"] == 3
    assert metrics["secure_dropped"] == 2
    _assert_close(summary, _expected(plain, set(grid.node_ids) - grid.drop_nodes))
    rows = strategy.round_clients[1]
    assert sorted(r["accepted"] for r in rows) == [False, False, True, True, True]
    assert {r["reason"] for r in rows if not r["accepted"]} == {
        "dropped after key sharing (no masked input)"
    }


def test_fewer_than_t_survivors_abort_cleanly_and_record_why(tmp_path, monkeypatch) -> None:
    # The real ServerApp and run store: 3 of 5 masked inputs lost, t = 3, 2 survivors.
    url = f"sqlite:///{tmp_path / 'runs.db'}"
    monkeypatch.setenv("LEANFED_DB_URL", url)
    cfg = CFG.replace(secure_mode="secagg")
    grid = DropoutGrid(client_app, 5, run_config=cfg.to_run_config(), record=True)
    grid.drop_nodes = set(grid.node_ids[:3])
    context = Context(
        run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config=cfg.to_run_config()
    )
    server_app(grid, context)
    with RunStore(url) as store:
        (run,) = store.list_runs()
        assert run.status == "failed"  # its only round used no update (server.session)
        (rnd,) = store.get_rounds(run.id)
        assert rnd.metrics["secagg_aborted"] == 1 and rnd.metrics["num_accepted"] == 0
        rows = store.get_client_results(run.id)
    assert len(rows) == 5 and not any(r.accepted for r in rows)
    reasons = [str(r.reason) for r in rows]
    assert all(r.startswith("secure aggregation aborted: 2 of 5 nodes") for r in reasons)
    assert all("need 3 surviving group members" in r for r in reasons)
    assert sum("(dropped after key sharing" in r for r in reasons) == 3
    # no unmask request went out: the survivors were never asked for shares
    assert not any(m.metadata.message_type == "query.secagg_unmask" for m in grid.received)


def test_secagg_needs_the_sparse_mean() -> None:
    with pytest.raises(ConfigError, match="secure.mode"):
        CFG.replace(secure_mode="secagg", aggregation_rule="median")


def test_readjustment_round_sums_votes_and_keeps_the_density() -> None:
    # RigL clients prune and regrow in round 1 (R_end = 2): the secure round sums
    # per-coordinate weights and the 0/1 votes too, and the server re-votes the mask.
    cfg = CFG.replace(
        secure_mode="secagg", num_server_rounds=2, dst_rule="rigl", dst_end_round_fraction=1.0
    )
    _, strategy, summary = _run(cfg)
    first, second = summary.rounds
    assert first.metrics["secagg_aborted"] == 0 and second.metrics["secagg_aborted"] == 0
    assert first.upload_bytes > 1.5 * second.upload_bytes  # votes over every masked entry
    assert strategy.mask_version == first.metrics["mask_changed"] == 1
    assert first.density == pytest.approx(second.density) == pytest.approx(0.2, abs=0.01)
