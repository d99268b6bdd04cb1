"""Record-level DP under SecAgg+: each site's epsilon in clear beside its masked vector, checked."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
from flwr.app import Context, Message, MetricRecord, RecordDict

from client.app import app as client_app
from server.runner import RunSummary, build_strategy, run_federated
from simulations.grid import DropoutGrid, quiet_flower
from strategies.aggregation.dp import DPSparseFedAvg
from strategies.aggregation.metric_rules import (
    DP_ROUNDS_KEY,
    EPSILON_KEY,
    MAX_EPSILON,
    WEIGHT_KEY,
    check_epsilon_record,
    check_metrics,
)
from strategies.aggregation.secagg_record import SecAggRecordDPSparseFedAvg
from strategies.privacy.accountant import epsilon
from tests.strategies.aggregation.test_secagg import CFG

Z = 1.2
RECORD = CFG.replace(privacy_mode="record", privacy_noise_multiplier=Z)
SECURE = RECORD.replace(secure_mode="secagg")
Held = tuple[DropoutGrid, Any, RunSummary]  # the grid, the strategy, the summary

GOOD = {EPSILON_KEY: 1.0, DP_ROUNDS_KEY: 1, WEIGHT_KEY: 20}  # well-formed (a wrong epsilon)
# (what a hostile site puts in clear beside its masked vector, the reason's tell-tale)
HOSTILE: dict[str, tuple[dict[str, Any], str]] = {
    "nan": ({"metrics": {**GOOD, EPSILON_KEY: math.nan}}, "must be finite"),
    "negative": ({"metrics": {**GOOD, EPSILON_KEY: -1.0}}, "must be in [0"),
    "huge": ({"metrics": {**GOOD, EPSILON_KEY: 1e300}}, "must be in [0"),
    "list": ({"metrics": {**GOOD, EPSILON_KEY: [1.0, 2.0]}}, "must be a scalar float"),
    "lie": ({"metrics": GOOD}, "is not the accountant's"),
    "extra-key": ({"metrics": {**GOOD, "train_loss": 0.3}}, "must hold exactly"),
    "no-rounds": ({"metrics": {EPSILON_KEY: 1.0, WEIGHT_KEY: 20}}, "must hold exactly"),
    "zero-rounds": ({"metrics": {**GOOD, DP_ROUNDS_KEY: 0}}, "must be in [1"),
    "too-many": ({"metrics": {**GOOD, WEIGHT_KEY: 10**6}}, "exceeds the cap"),
    "extra-record": (
        {"metrics": GOOD, "loss": {"train_loss": 0.3}},
        "must be exactly 'metrics'",
    ),
    "missing": ({}, "must be exactly 'metrics'"),
}


class TamperGrid(DropoutGrid):
    """The real ClientApps, but one node's train reply carries `records` in clear instead."""

    def __init__(self, *args: Any, records: dict[str, dict[str, Any]], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.hostile, self.records = self.node_ids[0], records

    def send_and_receive(self, messages: Any, *, timeout: float | None = None) -> list[Message]:
        replies = list(super().send_and_receive(messages, timeout=timeout))
        for r in replies:
            if r.metadata.message_type == "train" and r.metadata.src_node_id == self.hostile:
                for name in list(r.content.metric_records):
                    del r.content.metric_records[name]
                for name, rec in self.records.items():
                    r.content.metric_records[name] = MetricRecord(rec)
        return replies


def _run(cfg, grid: DropoutGrid | None = None) -> tuple[DropoutGrid, Any, RunSummary]:  # type: ignore[no-untyped-def]
    quiet_flower()
    grid = grid or DropoutGrid(client_app, cfg.num_partitions, run_config=cfg.to_run_config())
    held: dict[str, Any] = {}
    summary = run_federated(grid, cfg, on_round=lambda rec, s, a: held.setdefault("s", s))
    return grid, held["s"], summary


@pytest.fixture(scope="module")
def plain_record() -> Held:
    return _run(RECORD.replace(num_server_rounds=2))


def test_check_epsilon_record_accepts_the_three_bounded_numbers_only() -> None:
    good = {EPSILON_KEY: 2.5, DP_ROUNDS_KEY: 3, WEIGHT_KEY: 20}
    assert check_epsilon_record({"metrics": good}, 100) == (good, None)
    assert check_epsilon_record({"metrics": {**good, EPSILON_KEY: 0}}, 100)[1] is None
    assert check_epsilon_record({"metrics": {**good, EPSILON_KEY: MAX_EPSILON}}, 100)[1] is None
    assert "must be a scalar float" in str(
        check_epsilon_record({"metrics": {**good, EPSILON_KEY: True}}, 100)[1]
    )
    assert "must be an int" in str(
        check_epsilon_record({"metrics": {**good, DP_ROUNDS_KEY: 2.0}}, 100)[1]
    )
    for name, (records, why) in HOSTILE.items():
        kept, problem = check_epsilon_record(records, 100)
        if name == "lie":  # well-formed: only the recomputation catches it
            assert problem is None and kept == GOOD
            continue
        assert kept == {} and problem is not None and why in problem, problem


@pytest.mark.parametrize("value", [math.nan, -0.5, 2 * MAX_EPSILON, math.inf])
def test_plain_record_mode_rejects_a_bad_epsilon_like_any_bad_metric(value: float) -> None:
    kept, problem = check_metrics("train", {"num-examples": 10, EPSILON_KEY: value}, 100)
    assert kept == {} and problem is not None and EPSILON_KEY in problem


def test_runner_builds_the_secure_record_strategy() -> None:
    strategy = build_strategy(SECURE)
    assert (
        isinstance(strategy, SecAggRecordDPSparseFedAvg) and strategy.delta == SECURE.privacy_delta
    )
    assert isinstance(build_strategy(RECORD), DPSparseFedAvg)


def test_secure_record_dp_records_the_same_epsilon_as_plain_record_dp(
    plain_record: Held, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from server.app import app as server_app
    from server.store import RunStore
    from simulations.cli import app as cli
    from simulations.report import write_report

    _, plain_strategy, plain_summary = plain_record
    expected = [r.metrics[EPSILON_KEY] for r in plain_summary.rounds]
    assert len(expected) == 2 and 0 < expected[0] < expected[1]
    # every site took 3 DP-SGD steps a round, so round r's epsilon is the worst site's at 3r
    assert expected[1] <= epsilon(Z, 1.0, 6, RECORD.privacy_delta)

    url = f"sqlite:///{tmp_path / 'runs.db'}"
    monkeypatch.setenv("LEANFED_DB_URL", url)
    cfg = SECURE.replace(num_server_rounds=2)
    grid = DropoutGrid(client_app, 5, run_config=cfg.to_run_config(), record=True)
    ctx = Context(
        run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config=cfg.to_run_config()
    )
    server_app(grid, ctx)
    with RunStore(url) as store:
        (run,) = store.list_runs()
        rounds = store.get_rounds(run.id)
        report = write_report(store, run.id, tmp_path / "report").read_text()
    assert run.status == "completed"
    assert [r.metrics[EPSILON_KEY] for r in rounds] == pytest.approx(expected, rel=1e-12)
    assert all(r.metrics["secagg_aborted"] == 0 and r.metrics["num_accepted"] == 5 for r in rounds)
    assert all(r.metrics["dp_delta"] == cfg.privacy_delta for r in rounds)
    assert "## Privacy" in report and f"{rounds[-1].metrics[EPSILON_KEY]:.3f}" in report
    out = CliRunner().invoke(cli, ["runs", "show", run.id, "--db", url])
    assert out.exit_code == 0, out.output
    assert EPSILON_KEY in out.output
    # the only clear metrics of a masked train reply are the site's accounting record
    train = [m for m in grid.received if m.metadata.message_type == "train"]
    assert len(train) == 10
    for m in train:
        assert set(m.content.metric_records) == {"metrics"}
        clear = m.content.metric_records["metrics"]
        assert set(clear) == {EPSILON_KEY, DP_ROUNDS_KEY, WEIGHT_KEY}
        assert clear[WEIGHT_KEY] > 0
        assert set(m.content.array_records) == set()
    # every site trains every round (5 of 5 sampled): its count is the round
    counts = sorted(int(m.content.metric_records["metrics"][DP_ROUNDS_KEY]) for m in train)
    assert counts == [1] * 5 + [2] * 5


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_a_hostile_epsilon_leaves_the_sum_as_a_recorded_dropout(
    case: str, plain_record: Held
) -> None:
    records, why = HOSTILE[case]
    grid = TamperGrid(client_app, 5, run_config=SECURE.to_run_config(), records=records)
    _, strategy, summary = _run(SECURE, grid)
    (rnd,) = summary.rounds
    # 4 of 5 inputs are summed (t = 3): the round completes without the hostile node
    assert rnd.metrics["secagg_aborted"] == 0 and rnd.metrics["num_accepted"] == 4
    assert rnd.metrics["secure_dropped"] == 1 and rnd.metrics["num_rejected"] == 1
    honest = {
        row["node_id"]: row["metrics"][EPSILON_KEY]
        for row in strategy.round_clients[1]
        if row["node_id"] != grid.hostile
    }
    # each honest site's epsilon is the one it reports in plain record-level DP
    plain = {
        row["node_id"]: row["metrics"].get(EPSILON_KEY) for row in plain_record[1].round_clients[1]
    }
    assert len(honest) == 4 and all(honest[n] == plain[n] for n in honest)
    assert rnd.metrics[EPSILON_KEY] == max(honest.values())
    assert math.isfinite(rnd.metrics[EPSILON_KEY]) and rnd.metrics[EPSILON_KEY] <= MAX_EPSILON
    (bad,) = [row for row in strategy.round_clients[1] if row["node_id"] == grid.hostile]
    assert not bad["accepted"] and bad["metrics"] == {}
    assert str(bad["reason"]).startswith("plaintext metrics:") and why in str(bad["reason"])
    assert [r["node_id"] for r in strategy.rejections] == [grid.hostile]
