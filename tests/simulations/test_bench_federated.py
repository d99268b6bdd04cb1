"""The federated benchmark's quick variant writes complete, consistent results."""

from __future__ import annotations

import json
from pathlib import Path

from simulations.bench_federated import accuracy_at_budget, run_bench

REQUIRED = {
    "strategy", "rule", "density", "rounds", "final_accuracy", "accuracy_per_round",
    "upload_bytes", "download_bytes", "round_wall_s", "dataset", "seed", "num_clients", "alpha",
    "task", "client_train_s", "condensed", "low_capacity",
}


def test_quick_bench(tmp_path: Path) -> None:
    run_bench(tmp_path, dataset="digits", clients=4, rounds=2, quick=True, progress=False)
    rows = json.loads((tmp_path / "results.json").read_text())
    assert [r["strategy"] for r in rows][0] == "flower-fedavg"
    assert {r["rule"] for r in rows} == {"dense", "static", "rigl", "channel"}
    assert {r["task"] for r in rows} == {"cnn"}
    for r in rows:
        assert set(r) >= REQUIRED
        assert r["rounds"] == 2 and len(r["accuracy_per_round"]) == 2
        assert all(0.0 <= a <= 1.0 for a in r["accuracy_per_round"])
        assert isinstance(r["upload_bytes"], int) and isinstance(r["download_bytes"], int)
        assert r["upload_bytes"] == sum(r["upload_bytes_per_round"])
        assert sum(r["client_sizes"]) == 1437  # digits: 1797 examples, 80 % for training
        assert isinstance(r["client_train_s"], float) and r["client_train_s"] > 0
    dense = rows[0]
    channel = [r for r in rows if r["rule"] == "channel"]
    masked, condensed, mixed = channel  # d=0.5: masked, condensed, half at capacity 0.25
    assert (masked["condensed"], condensed["condensed"], mixed["condensed"]) == (False, True, True)
    assert mixed["low_capacity"] == 0.25 and condensed["low_capacity"] == 1.0
    # the sub-network drops dead units' tensors and every channel mask bit, both directions
    assert condensed["download_bytes"] < masked["download_bytes"]
    assert condensed["upload_bytes"] < masked["upload_bytes"]
    # a node's capacity is learned from its first reply: only nodes sampled again get less
    assert mixed["download_bytes"] <= condensed["download_bytes"]
    for r in rows[1:]:
        if r["density"] != 0.1:
            continue
        # density 0.1 must cost a fraction of the dense payload in both directions
        assert r["upload_bytes"] < 0.35 * dense["upload_bytes"]
        assert r["download_bytes"] < 0.35 * dense["download_bytes"]
    assert (tmp_path / "accuracy_vs_round.png").stat().st_size > 0
    assert (tmp_path / "accuracy_vs_upload.png").stat().st_size > 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary["targets"]) == {
        "feddst-0.1-fp32",
        "feddst-0.1-fp16",
        "channel-0.5-masked",
        "channel-0.5-condensed",
        "channel-0.5-condensed-mixed0.25",
    }
    mixed_t = summary["targets"]["channel-0.5-condensed-mixed0.25"]
    assert set(mixed_t) >= {"client_train_ratio", "gap_vs_full_capacity_points", "upload_ratio"}


def test_accuracy_at_budget_counts_cumulative_upload() -> None:
    row = {
        "initial_accuracy": 0.1,
        "accuracy_per_round": [0.5, 0.7, 0.9],
        "upload_bytes_per_round": [100, 100, 100],
    }
    assert accuracy_at_budget(row, 50) == 0.1
    assert accuracy_at_budget(row, 200) == 0.7
    assert accuracy_at_budget(row, 10_000) == 0.9
