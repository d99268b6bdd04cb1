"""The federated benchmark's quick variant writes complete, consistent results."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from simulations.bench_federated import run_bench
from simulations.federated_targets import accuracy_at_budget

REQUIRED = {
    "strategy", "rule", "density", "rounds", "final_accuracy", "accuracy_per_round",
    "upload_bytes", "download_bytes", "round_wall_s", "dataset", "seed", "num_clients", "alpha",
    "task", "client_train_s", "condensed", "low_capacity",
}


def test_quick_bench(tmp_path: Path) -> None:
    run_bench(tmp_path, dataset="digits", clients=4, rounds=2, quick=True, progress=False)
    every = json.loads((tmp_path / "results.json").read_text())
    assert [r["task"] for r in every] == ["cnn"] * 7 + ["transformer"] * 3 + ["gnn"] * 3
    rows = [r for r in every if r["task"] == "cnn"]
    assert [r["strategy"] for r in rows][0] == "flower-fedavg"
    assert {r["rule"] for r in rows} == {"dense", "static", "rigl", "channel"}
    for r in every:
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
    for prefix in ("", "transformer_", "gnn_"):
        assert (tmp_path / f"{prefix}accuracy_vs_round.png").stat().st_size > 0
        assert (tmp_path / f"{prefix}accuracy_vs_upload.png").stat().st_size > 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert list(summary["targets"]) == ["cnn", "transformer", "gnn"]
    assert set(summary["targets"]["cnn"]) == {
        "feddst-0.1-fp32",
        "feddst-0.1-fp16",
        "channel-0.5-masked",
        "channel-0.5-condensed",
        "channel-0.5-condensed-mixed0.25",
    }
    for task in ("transformer", "gnn"):
        check_task_rows(every, summary, task)
    mixed_t = summary["targets"]["cnn"]["channel-0.5-condensed-mixed0.25"]
    assert set(mixed_t) >= {"client_train_ratio", "gap_vs_full_capacity_points", "upload_ratio"}


def check_task_rows(every: list[dict[str, Any]], summary: dict[str, Any], task: str) -> None:
    """Transformer/GNN: Flower dense FedAvg, FedDST RigL 0.1, condensed channel 0.5 (Adam)."""
    dense, rigl, chan = (r for r in every if r["task"] == task)
    assert (dense["strategy"], dense["rule"], dense["density"]) == ("flower-fedavg", "dense", 1.0)
    assert (rigl["strategy"], rigl["rule"], rigl["density"]) == ("leanfed-feddst", "rigl", 0.1)
    assert (chan["rule"], chan["density"], chan["condensed"]) == ("channel", 0.5, True)
    assert {r["model"] for r in (dense, rigl, chan)} == {task}
    assert {r["local_optimizer"] for r in (dense, rigl, chan)} == {"adam"}
    assert rigl["upload_bytes"] < 0.35 * dense["upload_bytes"]
    assert rigl["download_bytes"] < 0.35 * dense["download_bytes"]
    # half the units (heads, MLP width, GCN channels) leave the sub-network both ways
    assert chan["upload_bytes"] < dense["upload_bytes"]
    assert chan["download_bytes"] < dense["download_bytes"]
    t = summary["targets"][task]
    assert set(t) == {"feddst-0.1-fp32", "channel-0.5-condensed"}
    for key in t:
        assert set(t[key]) >= {
            "accuracy_gap_points", "client_train_ratio", "median_round_wall_ratio",
            "upload_ratio", "download_ratio",
        }
        assert t[key]["client_train_ratio"] > 0
    assert t["feddst-0.1-fp32"]["upload_ratio"] == rigl["upload_bytes"] / dense["upload_bytes"]


def test_accuracy_at_budget_counts_cumulative_upload() -> None:
    row = {
        "initial_accuracy": 0.1,
        "accuracy_per_round": [0.5, 0.7, 0.9],
        "upload_bytes_per_round": [100, 100, 100],
    }
    assert accuracy_at_budget(row, 50) == 0.1
    assert accuracy_at_budget(row, 200) == 0.7
    assert accuracy_at_budget(row, 10_000) == 0.9
