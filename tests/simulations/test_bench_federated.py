"""The federated benchmark's quick variant writes complete, consistent results."""

from __future__ import annotations

import json
from pathlib import Path

from simulations.bench_federated import accuracy_at_budget, run_bench

REQUIRED = {
    "strategy", "rule", "density", "rounds", "final_accuracy", "accuracy_per_round",
    "upload_bytes", "download_bytes", "round_wall_s", "dataset", "seed", "num_clients", "alpha",
}


def test_quick_bench(tmp_path: Path) -> None:
    run_bench(tmp_path, dataset="digits", clients=4, rounds=2, quick=True, progress=False)
    rows = json.loads((tmp_path / "results.json").read_text())
    assert [r["strategy"] for r in rows][0] == "flower-fedavg"
    assert {r["rule"] for r in rows} == {"dense", "static", "rigl"}
    for r in rows:
        assert set(r) >= REQUIRED
        assert r["rounds"] == 2 and len(r["accuracy_per_round"]) == 2
        assert all(0.0 <= a <= 1.0 for a in r["accuracy_per_round"])
        assert isinstance(r["upload_bytes"], int) and isinstance(r["download_bytes"], int)
        assert r["upload_bytes"] == sum(r["upload_bytes_per_round"])
        assert sum(r["client_sizes"]) == 1437  # digits: 1797 examples, 80 % for training
    dense = rows[0]
    for r in rows[1:]:
        # density 0.1 must cost a fraction of the dense payload in both directions
        assert r["upload_bytes"] < 0.35 * dense["upload_bytes"]
        assert r["download_bytes"] < 0.35 * dense["download_bytes"]
    assert (tmp_path / "accuracy_vs_round.png").stat().st_size > 0
    assert (tmp_path / "accuracy_vs_upload.png").stat().st_size > 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary["targets"]) == {"feddst-0.1-fp32", "feddst-0.1-fp16"}


def test_accuracy_at_budget_counts_cumulative_upload() -> None:
    row = {
        "initial_accuracy": 0.1,
        "accuracy_per_round": [0.5, 0.7, 0.9],
        "upload_bytes_per_round": [100, 100, 100],
    }
    assert accuracy_at_budget(row, 50) == 0.1
    assert accuracy_at_budget(row, 200) == 0.7
    assert accuracy_at_budget(row, 10_000) == 0.9
