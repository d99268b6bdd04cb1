"""The robustness benchmark's quick variant writes the issue's results.json schema and a plot."""

from __future__ import annotations

import json
from pathlib import Path

from simulations.bench_robustness import RECOMMENDED, run_bench, targets

ROW = {"rule", "attack", "attackers", "final_accuracy", "seed"}


def test_quick_bench_schema(tmp_path: Path) -> None:
    run_bench(tmp_path, seed=3, quick=True)
    result = json.loads((tmp_path / "results.json").read_text())
    rows = result["byzantine"]
    assert len(rows) == 2 * (1 + 2)  # 2 rules x (no attack + 2 attacks x 1 attacker)
    assert {r["rule"] for r in rows} == {"mean", RECOMMENDED}
    for r in rows:
        assert set(r) >= ROW and r["seed"] == 3
        assert 0.0 <= r["final_accuracy"] <= 1.0
        assert (r["attack"] == "none") == (r["attackers"] == 0)
    assert result["targets"]["recommended"]["rule"] == RECOMMENDED
    assert (tmp_path / "byzantine_accuracy.png").stat().st_size > 0
    for section, keys in {
        "fuzz": {
            "tried",
            "crashes",
            "nonfinite_globals",
            "honest_rejected",
            "rejected_without_reason",
        },
        "codec": {"tried", "foreign_exceptions", "max_decode_ms", "max_decode_mb"},
    }.items():
        assert set(result[section]) >= keys


def test_targets_measure_the_worst_drop() -> None:
    rows = [
        {"rule": RECOMMENDED, "attack": "none", "attackers": 0, "final_accuracy": 0.9},
        {"rule": RECOMMENDED, "attack": "shift", "attackers": 1, "final_accuracy": 0.89},
        {"rule": RECOMMENDED, "attack": "shift", "attackers": 2, "final_accuracy": 0.85},
    ]
    t = targets(rows)
    assert round(t[RECOMMENDED]["worst_drop_points"], 6) == 5.0
    assert t["recommended"]["met"] is False
