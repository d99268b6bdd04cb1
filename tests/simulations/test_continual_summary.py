"""CL metrics of any recorded continual run; runs list/show settings, integer counts; --version."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from server.store import RunStore
from simulations.continual_summary import accuracy_matrix, cl_summary, format_cl, task_rows
from strategies.continual.metrics import bwt_gem, fwt_gem

R = [[0.9, 0.1, 0.2], [0.7, 0.8, 0.3], [0.6, 0.7, 0.9]]


def _store_cl_run(url: str, config: dict[str, object], name: str) -> str:
    """A finished continual run whose round r stores row r-1 of R as task_acc.J metrics."""
    with RunStore(url) as store:
        run = store.create_run(config, seed=0, name=name)
        for rnd, row in enumerate(R, start=1):
            store.record_round(
                run,
                rnd,
                metrics={
                    "accuracy": float(np.mean(row)),
                    "num_accepted": 3.0,
                    "loss": 1.0,
                    **{f"task_acc.{j}": a for j, a in enumerate(row)},
                },
                upload_bytes=1,
                download_bytes=1,
                wall_s=0.1,
                density=0.2,
                client_results=[],
                mask_blob=b"\xff",
                layer_densities={"fc.weight": 0.2},
                checkpoint=b"c",
                events=[],
                train_loss=1.5,
                accuracy=float(np.mean(row)),
            )
        store.finish_run(run, "completed")
    return run


def test_matrix_rows_are_the_last_round_of_each_experience() -> None:
    rows = {2 * (i + 1): r for i, r in enumerate(R)} | {1: [0.5, 0.5, 0.5], 3: [0.0, 0.0, 0.0]}
    found = accuracy_matrix(rows, 2, [0.1, 0.1, 0.1])
    assert found is not None
    mat, last = found
    assert last == 2 and np.allclose(mat.r, np.array(R))
    cl = cl_summary(rows, 2, [0.1, 0.1, 0.1])
    assert cl["acc"] == pytest.approx(np.mean(R[2]))
    assert cl["bwt_gem"] == pytest.approx(bwt_gem(np.array(R)))
    assert cl["fwt_gem"] == pytest.approx(fwt_gem(np.array(R), np.array([0.1, 0.1, 0.1])))
    assert format_cl(cl).startswith("ACC 0.733, BWT -0.200, FWT ")
    # a run stopped after the second experience: metrics after experience 1
    part = cl_summary({2: R[0], 4: R[1]}, 2)
    assert part["acc"] == pytest.approx(0.75) and "fwt_gem" not in part
    assert cl_summary({}, 2) == {} and cl_summary({1: R[0]}, 2) == {}


def test_task_rows_from_round_metrics() -> None:
    metrics = {1: {"task_acc.1": 0.2, "task_acc.0": 0.9, "accuracy": 0.5}, 2: {"accuracy": 1.0}}
    assert task_rows(metrics) == {1: [0.9, 0.2]}


def test_runs_list_and_show_say_what_a_run_was(tmp_path: Path) -> None:
    from simulations.cli import app

    url = f"sqlite:///{tmp_path / 'runs.db'}"
    config = {
        "dataset": "digits",
        "model": "examples.my_plugins:tiny_net",
        "strategy": "sparse",
        "aggregation.rule": "fedadam",
        "dst.rule": "rigl",
        "dst.density": 0.2,
        "cl.scenario": "split-mnist",
        "cl.rounds-per-task": 1,
    }
    run = _store_cl_run(url, config, "cl")
    runner = CliRunner(env={"COLUMNS": "300"})
    res = runner.invoke(app, ["runs", "list", "--db", url])
    assert res.exit_code == 0, res.output
    for text in ("digits", "sparse/fedadam", "rigl", "0.2"):
        assert text in res.output
    res = runner.invoke(app, ["runs", "show", run[:8], "--db", url])
    assert res.exit_code == 0, res.output
    (line,) = [ln for ln in res.output.splitlines() if "final num_accepted" in ln]
    assert line.split("│")[2].strip() == "3"  # a count prints as an integer
    assert "ACC 0.733, BWT -0.200" in res.output and "examples.my_plugins:tiny_net" in res.output
    res = runner.invoke(app, ["--version"])
    assert res.exit_code == 0 and res.output.startswith("leanfed ")


def test_report_plots_the_accuracy_matrix_and_names_the_run(tmp_path: Path) -> None:
    from matplotlib.figure import Figure

    import simulations.report as report

    url = f"sqlite:///{tmp_path / 'runs.db'}"
    config = {
        "dataset": "digits",
        "model": "mlp",
        "strategy": "sparse",
        "dst.rule": "rigl",
        "dst.density": 0.2,
        "cl.scenario": "split-mnist",
        "cl.rounds-per-task": 1,
    }
    titles: list[str] = []
    real_save = report._save

    def spy(fig: Figure, path: Path) -> Path:
        titles.append(fig._suptitle.get_text() if fig._suptitle else "")
        return real_save(fig, path)

    run = _store_cl_run(url, config, "cl-run")
    with RunStore(url) as store:
        report._save = spy  # type: ignore[assignment]
        try:
            md = report.write_report(store, run, tmp_path / "out")
        finally:
            report._save = real_save  # type: ignore[assignment]
    assert (tmp_path / "out" / "accuracy_matrix.png").stat().st_size > 0
    assert "accuracy_matrix.png" in md.read_text()
    assert titles and all(
        t.startswith("cl-run: digits, model mlp, sparse/mean, DST rigl") for t in titles
    )
