"""`leanfed bench continual --quick`: writes valid results.json rows, plot and targets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import typer
from typer.testing import CliRunner

from simulations.bench_continual import METHODS, register, run_bench

REQUIRED = {
    "method",
    "density",
    "acc",
    "bwt",
    "fwt",
    "forgetting",
    "forgetting_chaudhry",
    "forgetting_avalanche",
    "bwt_avalanche",
    "fwt_avalanche",
    "train_flops",
    "upload_bytes",
    "seed",
    "accuracy_matrix",
}


@pytest.fixture
def one_thread():  # type: ignore[no-untyped-def]
    # Tiny CNN batches: intra-op threads only add contention on a busy 2-core runner.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.usefixtures("one_thread")
def test_quick_run_writes_valid_results(tmp_path: Path) -> None:
    # No wall-time assertion: timing belongs in benchmarks, not in a test on a shared machine.
    rows = run_bench(tmp_path, seed=0, quick=True, progress=False)
    assert json.loads((tmp_path / "results.json").read_text()) == rows
    assert [r["method"] for r in rows] == list(METHODS)
    for r in rows:
        assert set(r) >= REQUIRED
        assert 0.0 <= r["acc"] <= 1.0 and r["seed"] == 0
        assert -1.0 <= r["bwt"] <= 1.0 and -1.0 <= r["fwt"] <= 1.0
        # Chaudhry's max over earlier rows >= Avalanche's R[j, j]; both may be < 0 (BWT > 0).
        assert -1.0 <= r["forgetting_avalanche"] <= r["forgetting_chaudhry"] + 1e-12 <= 1.0
        mat = r["accuracy_matrix"]
        assert len(mat) == 5 and all(len(row) == 5 for row in mat)
        assert all(0.0 <= v <= 1.0 for row in mat for v in row)
        assert r["train_flops"] > 0 and r["upload_bytes"] > 0
        assert r["task_switch_events"] == 4 * r["num_clients"]  # every client, every boundary
    by = {r["method"]: r for r in rows}
    assert by["leanfed"]["density"] <= 0.2 and by["fedavg-naive"]["density"] == 1.0
    # Sparse training costs a fraction of the dense FLOPs for the same examples (in --quick a
    # regrowth's dense-gradient batch comes with only 3 training steps, hence the loose bound).
    assert by["leanfed"]["train_flops"] < 0.5 * by["fedavg-replay"]["train_flops"]
    assert by["leanfed"]["upload_bytes"] < by["fedavg-replay"]["upload_bytes"]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary["targets"]) >= {"acc_target_met", "flops_ratio_vs_dense"}
    assert (tmp_path / "accuracy_matrix.png").stat().st_size > 1000


def test_cli_is_registered() -> None:
    bench = typer.Typer()
    register(bench)
    bench.command("noop")(lambda: None)  # a second command keeps typer's group form
    out = CliRunner().invoke(bench, ["continual", "--help"])
    assert out.exit_code == 0 and "--quick" in out.output
