"""Tests of the run report (PNGs + report.md) and of `leanfed runs list|show` / `report`."""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa
import typer
from typer.testing import CliRunner

from server.store import RunStore
from server.store.urls import ENV_VAR, sqlite_file_url
from simulations.report import write_report
from simulations.runs_cli import register

PNGS = ("accuracy_loss.png", "bytes.png", "layer_density.png", "accuracy_vs_upload.png")


def _fake_run(store: RunStore, name: str, *, density: float, baseline_of: str | None = None) -> str:
    config: dict[str, object] = {"dataset": "digits", "density": density}
    if baseline_of:
        config["baseline_of"] = baseline_of
    run = store.create_run(config, seed=0, name=name)
    for rnd in (1, 2, 3):
        store.record_round(
            run,
            rnd,
            metrics={"accuracy": 0.5 + 0.1 * rnd, "train_loss": 2.0 / rnd},
            upload_bytes=int(400_000 * density) * rnd,
            download_bytes=int(500_000 * density),
            wall_s=0.25,
            density=density,
            client_results=[
                {"node_id": 1, "accepted": True},
                {"node_id": 2, "accepted": rnd != 2, "reason": None if rnd != 2 else "NaN values"},
            ],
            mask_blob=b"\xff" * 8,
            layer_densities={"conv.weight": density * 2, "fc.weight": density / 2},
            checkpoint=f"ckpt-{name}-{rnd}".encode(),
            events=[{"kind": "task_switch", "detail": {"task": rnd}}] if rnd == 3 else [],
        )
    store.finish_run(run, "completed")
    return run


@pytest.fixture
def db(tmp_path: Path) -> tuple[str, str, str]:
    url = sqlite_file_url(tmp_path / "leanfed.db")
    with RunStore(url) as store:
        sparse = _fake_run(store, "sparse-rigl", density=0.1)
        dense = _fake_run(store, "dense", density=1.0, baseline_of=sparse)
    return url, sparse, dense


def test_write_report(db: tuple[str, str, str], tmp_path: Path) -> None:
    url, sparse, dense = db
    out = tmp_path / "report"
    with RunStore(url) as store:
        path = write_report(store, sparse, out)
    assert path == out / "report.md"
    text = path.read_text()
    for png in PNGS:
        assert (out / png).stat().st_size > 1000
        assert f"]({png})" in text
    assert sparse in text and "sparse-rigl" in text
    assert "baseline: dense" in text and dense in text  # found via config baseline_of
    assert text.count("\n| 1 |") + text.count("\n| 2 |") + text.count("\n| 3 |") == 3
    assert "rejected: 1" in text and "NaN values" in text and "task_switch: 1" in text
    assert "SHA-256" in text


def test_report_of_empty_run_still_writes_markdown(tmp_path: Path) -> None:
    with RunStore("sqlite://") as store:
        run = store.create_run({"dataset": "digits"})
        path = write_report(store, run, tmp_path)
    text = path.read_text()
    assert "rounds stored: 0" in text and "_no data stored for this plot_" in text
    assert not list(tmp_path.glob("*.png"))


# ------------------------------------------------------------------------- CLI
@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch) -> typer.Typer:
    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.setenv("COLUMNS", "200")
    app = typer.Typer()
    register(app)
    return app


def test_runs_list_and_show(cli: typer.Typer, db: tuple[str, str, str]) -> None:
    url, sparse, dense = db
    runner = CliRunner()
    res = runner.invoke(cli, ["runs", "list", "--db", url])
    assert res.exit_code == 0, res.output
    assert sparse[:12] in res.output and dense[:12] in res.output and "0.8000" in res.output
    assert "completed" in res.output
    res = runner.invoke(cli, ["runs", "show", sparse[:8], "--db", url])
    assert res.exit_code == 0, res.output
    with RunStore(url) as store:
        sha = store.checkpoint_sha256(sparse)
    assert sha is not None and sha[1] in res.output
    assert "final accuracy" in res.output and "completed" in res.output


def test_report_command_uses_env_url(
    cli: typer.Typer, db: tuple[str, str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url, sparse, dense = db
    monkeypatch.setenv(ENV_VAR, url)
    out = tmp_path / "rep"
    res = CliRunner().invoke(cli, ["report", sparse, "--out", str(out), "--baseline", dense])
    assert res.exit_code == 0, res.output
    assert (out / "report.md").exists() and (out / "accuracy_vs_upload.png").exists()


def test_cli_errors_are_one_line_without_traceback(
    cli: typer.Typer, db: tuple[str, str, str], tmp_path: Path
) -> None:
    url, sparse, _ = db
    runner = CliRunner()
    cases = {
        "no run with id": ["runs", "show", "deadbeefdead", "--db", url],
        "host 127.0.0.1:1": ["runs", "list", "--db", "postgresql://u@127.0.0.1:1/x"],
        "no leanfed database": ["runs", "list", "--db", str(tmp_path / "missing.db")],
    }
    with RunStore(url) as store, store.engine.begin() as conn:
        newer = sqlite_file_url(tmp_path / "newer.db")
        conn.execute(sa.text(f"VACUUM INTO '{newer[len('sqlite:///') :]}'"))
    with sa.create_engine(newer).begin() as conn:
        conn.execute(sa.text("UPDATE alembic_version SET version_num = 'ffff9999'"))
    cases["newer than this leanfed"] = ["report", sparse, "--out", str(tmp_path), "--db", newer]
    for expected, args in cases.items():
        res = runner.invoke(cli, args)
        assert res.exit_code == 1, (args, res.output)
        assert expected in res.output and "Traceback" not in res.output
        assert not isinstance(res.exception, Exception) or isinstance(res.exception, SystemExit)
