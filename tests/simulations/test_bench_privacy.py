"""The privacy benchmark's quick variant writes complete rows in the issue's schema."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from simulations.bench_privacy import neighbours_for, run_bench

SECURE_KEYS = {"dropout", "upload_ratio", "aborted_rounds"}  # beyond the schema


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict[str, Any]], Path]:
    """One in-process (jobs=1) quick run and its output folder, shared by the module: the
    schema test checks it and the jobs test compares a jobs=2 run with it (each used to
    run the same seeded bench on its own)."""
    out = tmp_path_factory.mktemp("privacy-quick")
    return run_bench(out, seed=1, rounds=2, quick=True, dataset="digits"), out


def test_quick_privacy_bench(
    quick_run: tuple[list[dict[str, Any]], Path], privacy_row_keys: frozenset[str]
) -> None:
    rows, tmp_path = quick_run
    assert rows == json.loads((tmp_path / "results.json").read_text())
    assert [(r["mode"], r["clients"], r["dropout"]) for r in rows] == [
        ("plain", 4, 0.0),
        ("secagg", 4, 0.0),
        ("secagg", 4, 0.3),
    ]
    for r in rows:
        assert set(r) >= privacy_row_keys | SECURE_KEYS
        assert r["epsilon"] is None and r["delta"] is None and r["seed"] == 1
        assert r["density"] == 0.1 and len(r["round_wall_s"]) == 2
        assert 0.0 <= r["final_accuracy"] <= 1.0
        assert isinstance(r["upload_bytes"], int) and r["upload_bytes"] > 0
        assert r["aborted_rounds"] == 0
    plain, secure, dropped = rows
    assert plain["upload_ratio"] == 1.0
    # 4 clients: 16 + ceil(log2(4 * 4096)) = 30-bit values vs fp32, plus small key stages
    assert 0.9 < secure["upload_ratio"] < 1.5
    assert secure["accepted_per_round"] == [4, 4] and dropped["accepted_per_round"] == [3, 3]
    assert (tmp_path / "upload_bytes.png").stat().st_size > 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary["targets"]) == {"secagg-4-dropout-0.0", "secagg-4-dropout-0.3"}


TIMING = {"round_wall_s"}  # arms side by side share the cores: only timing may differ


def _untimed(rows: list[dict[str, object]]) -> list[dict[str, object]]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def test_jobs_two_equals_jobs_one(
    quick_run: tuple[list[dict[str, Any]], Path], tmp_path: Path
) -> None:
    """Every arm is seeded on its own and runs on one torch thread, in process or not."""
    one, _ = quick_run
    two = run_bench(tmp_path / "2", seed=1, rounds=2, quick=True, dataset="digits", jobs=2)
    assert len(one) == 3 and _untimed(two) == _untimed(one)
    summary = json.loads((tmp_path / "2" / "summary.json").read_text())
    assert summary["jobs"] == 2 and summary["parts"] == ["secagg"]


def test_parts_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--parts"):
        run_bench(tmp_path, quick=True, parts=("dp", "tls"))
    with pytest.raises(ValueError, match="--dp-kinds"):
        run_bench(tmp_path, quick=True, parts=("dp",), dp_kinds=())
    with pytest.raises(ValueError, match="jobs"):
        run_bench(tmp_path, quick=True, dataset="digits", rounds=1, jobs=0)


def test_graph_degree_grows_with_log_n() -> None:
    assert neighbours_for(10) == 0 and neighbours_for(100) == 20


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--parts", "dp,tls"], "--parts"),
        (["--jobs", "0"], "--jobs"),
        (["--dp-kinds", "record,tls"], "--dp-kinds"),
    ],
)
def test_cli_refuses_bad_parts_and_jobs(tmp_path: Path, args: list[str], message: str) -> None:
    from typer.testing import CliRunner

    from simulations.cli import app

    result = CliRunner().invoke(app, ["bench", "privacy", "--out", str(tmp_path), *args])
    assert result.exit_code == 2 and message in result.output
    assert not (tmp_path / "results.json").exists()
