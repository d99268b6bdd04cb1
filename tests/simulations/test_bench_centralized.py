import json
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from simulations.bench_centralized import REQUIRED_KEYS, plan, register, run_centralized


@pytest.mark.timeout(180)  # ~15 s on an idle 2-core machine; generous cap for loaded CI
def test_quick_run_writes_valid_results(tmp_path: Path) -> None:
    rows = run_centralized(tmp_path, dataset="digits", seed=0, quick=True, progress=False)
    data = json.loads((tmp_path / "results.json").read_text())
    assert data == rows
    assert len(rows) == len(plan("digits", quick=True))
    for r in rows:
        assert set(REQUIRED_KEYS) <= set(r)
        assert 0.0 <= r["accuracy"] <= 1.0
        assert 0 < r["active_params"] <= r["total_params"]
        assert r["train_flops"] > 0 and r["inference_flops"] > 0
        assert r["dataset"] == "digits" and r["seed"] == 0
    dense = next(r for r in rows if r["task"] == "cnn/digits" and r["method"] == "dense")
    sparse = next(r for r in rows if r["task"] == "cnn/digits" and r["method"] == "rigl"
                  and r["density"] == 0.1)
    assert dense["active_params"] == dense["total_params"]
    assert sparse["inference_flops"] < dense["inference_flops"] / 3
    assert {r["method"] for r in rows} == {"dense", "static", "set", "rigl", "gmp"}
    assert {r["model"] for r in rows} == {"cnn", "transformer", "gnn"}
    assert (tmp_path / "accuracy_vs_density.png").stat().st_size > 1000


def test_full_plan_shape() -> None:
    specs = plan("mnist5k")
    cnn = [s for s in specs if s.model == "cnn"]
    assert len(cnn) == 1 + 4 * 4
    assert sorted({s.density for s in cnn if s.method != "dense"}) == [0.05, 0.1, 0.2, 0.5]
    for model in ("transformer", "gnn"):
        assert {(s.method, s.density) for s in specs if s.model == model} == {
            ("dense", 1.0), ("static", 0.2), ("set", 0.2), ("rigl", 0.2), ("gmp", 0.2)}


def test_cli_register(tmp_path: Path) -> None:
    app = typer.Typer()
    bench = typer.Typer()
    app.add_typer(bench, name="bench")
    register(bench)
    result = CliRunner().invoke(app, ["bench", "centralized", "--help"])
    assert result.exit_code == 0
    for opt in ("--out", "--dataset", "--seed", "--quick", "--workers"):
        assert opt in result.output
