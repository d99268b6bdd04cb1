"""The audit trail: who started a run and with which key, sites per round, rejections, DP."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from server.security.audit import audit_trail, operator
from server.store import RunStore
from simulations.cli import app


def _store(tmp_path: Path) -> tuple[str, str]:
    url = f"sqlite:///{tmp_path / 'a.db'}"
    with RunStore(url) as store:
        run = store.create_run(
            {"dataset": "digits", "dp.noise-multiplier": 1.1, "secure.mode": "secagg"},
            seed=0, started_by="alice@link", signing_key_id="ed25519:" + "ab" * 16,
            flower_run_id="77",
        )
        clients = [
            {"node_id": 11, "accepted": True},
            {"node_id": 12, "accepted": False, "reason": "[bold]norm 1e9 above bound"},
        ]
        store.record_round(run, 1, metrics={}, upload_bytes=1, download_bytes=1, wall_s=0.1,
                           client_results=clients)
        store.record_event(run, "run_resumed",
                           detail={"by": "bob@link", "key_id": None, "from_round": 1})
    return url, run


def test_audit_trail_entries(tmp_path: Path) -> None:
    url, run = _store(tmp_path)
    with RunStore(url) as store:
        trail = [(e.round, e.what, e.detail) for e in audit_trail(store, run)]
    assert trail == [
        (None, "created", f"by alice@link; checkpoints signed by ed25519:{'ab' * 16}; "
                          "Flower run 77"),
        (None, "resumed", "by bob@link after round 1 with no key"),
        (None, "privacy", "dp.noise-multiplier=1.1, secure.mode=secagg"),
        (1, "sites", "1 accepted: 11"),
        (1, "rejected", "node 12: [bold]norm 1e9 above bound"),
    ]
    assert "@" in operator()


def test_runs_show_by_flower_run_id_prints_the_trail(tmp_path: Path) -> None:
    url, run = _store(tmp_path)
    res = CliRunner().invoke(app, ["runs", "show", "flwr:77", "--db", url])
    assert res.exit_code == 0, res.output
    assert run in res.output and "alice@link" in res.output
    assert "[bold]norm 1e9" in res.output  # site text shown verbatim, never as markup
    res = CliRunner().invoke(app, ["runs", "show", "flwr:78", "--db", url])
    assert res.exit_code == 1 and "0 leanfed runs record Flower run id '78'" in res.output
