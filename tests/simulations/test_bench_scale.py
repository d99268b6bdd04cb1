"""`leanfed bench scale`: the quick variant's schema, the plan, the targets and missing cells."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from simulations.bench_scale import Cell, plan, run_bench, run_one, summarize, table_md

REQUIRED = {
    "engine", "strategy", "clients", "fraction", "round_s", "messages_per_s", "startup_s",
    "peak_rss_mb", "rss_per_idle_client_kb", "workers", "round_s_median", "model_sha256",
    "messages_per_round", "final_accuracy", "upload_bytes", "download_bytes",
}


def test_plan_covers_every_arm_and_checks_one_worker_at_1000() -> None:
    cells = plan([100, 1000, 10_000], [0.1, 1.0], workers=2, identity_check=1000)
    assert len(cells) == 3 * 2 * 3 + 2
    assert {(c.engine, c.strategy) for c in cells} == {
        ("ray", "flower-fedavg"), ("ray", "leanfed"), ("inprocess", "leanfed"),
    }
    assert [c for c in cells if c.workers == 1] == [
        Cell("inprocess", "leanfed", 1000, 0.1, 1), Cell("inprocess", "leanfed", 1000, 1.0, 1)
    ]
    loads = [c.clients * c.fraction for c in cells]
    assert loads == sorted(loads) and loads[-1] == 10_000  # the largest cells run last


def test_plan_for_one_engine_keeps_only_its_cells() -> None:
    cells = plan([1000, 10_000], [1.0], workers=2, identity_check=1000, engines=["inprocess"])
    assert cells == [
        Cell("inprocess", "leanfed", 1000, 1.0, 2),
        Cell("inprocess", "leanfed", 1000, 1.0, 1),
        Cell("inprocess", "leanfed", 10_000, 1.0, 2),
    ]
    ray_only = plan([1000], [0.1], workers=2, identity_check=1000, engines=["ray"])
    assert [(c.engine, c.strategy) for c in ray_only] == [
        ("ray", "flower-fedavg"), ("ray", "leanfed")
    ]  # no 1-worker identity cell without the embedded engine


def _row(engine: str, strategy: str, workers: int, round_s: float, sha: str = "a") -> dict:
    return {
        "engine": engine, "strategy": strategy, "clients": 1000, "fraction": 0.1,
        "workers": workers, "round_s_median": round_s, "messages_per_s": 100 / round_s,
        "model_sha256": sha, "round_s_min": round_s, "round_s_max": round_s,
        "messages_per_round": 100, "startup_s": 1.0, "peak_rss_mb": 10.0,
        "rss_per_idle_client_kb": 0.5,
    }


def test_summary_ratios_and_identity() -> None:
    rows = [
        _row("ray", "flower-fedavg", 2, 10.0),
        _row("ray", "leanfed", 2, 11.0),
        _row("inprocess", "leanfed", 2, 1.0, "x"),
        _row("inprocess", "leanfed", 1, 2.0, "x"),
        {"engine": "ray", "strategy": "leanfed", "clients": 10_000, "fraction": 1.0,
         "workers": 2, "missing": "did not finish"},
    ]
    t = summarize(rows)
    assert t["ray_leanfed_over_fedavg_round_s@1000x0.1"] == pytest.approx(1.1)
    assert t["inprocess_over_ray_fedavg_messages_per_s@1000x0.1"] == pytest.approx(10.0)
    assert t["bit_identical_workers_1_vs_2@1000x0.1"] is True
    assert not any(k.startswith("peak_rss_gb") for k in t)  # the 10,000 cell is missing
    table = table_md(rows)
    assert table.count("\n| ") == len(rows) and "missing: did not finish" in table


def test_a_cell_past_its_time_limit_is_recorded_as_missing() -> None:
    row = run_one(Cell("inprocess", "leanfed", 4, 1.0, 1), seed=0, rounds=1, timeout=0.5)
    assert row["missing"].startswith("did not finish 1 rounds within")
    assert (row["engine"], row["clients"], row["workers"]) == ("inprocess", 4, 1)


def test_a_cell_reports_its_worker_start_and_every_round_as_it_ends() -> None:
    lines: list[str] = []
    row = run_one(Cell("inprocess", "leanfed", 4, 1.0, 1), 0, 2, 300.0, lines.append)
    assert "missing" not in row and len(row["round_s"]) == 2
    assert "1 worker(s) started in" in lines[0]
    assert [line.split(":")[0] for line in lines[1:]] == ["round 1/2", "round 2/2"]


@pytest.mark.slow
def test_quick_bench_writes_every_row_and_the_plot(tmp_path: Path) -> None:
    rows = run_bench(tmp_path, seed=0, quick=True, workers=2)
    assert rows == json.loads((tmp_path / "results.json").read_text())
    assert len(rows) == 4  # the three arms at 50 % sampled + the 1-worker embedded twin
    assert not [r for r in rows if "missing" in r], [r.get("missing") for r in rows]
    assert {(r["engine"], r["strategy"]) for r in rows} == {
        ("ray", "flower-fedavg"), ("ray", "leanfed"), ("inprocess", "leanfed"),
    }
    for r in rows:
        assert set(r) >= REQUIRED
        assert r["clients"] == 8 and r["fraction"] == 0.5
        assert len(r["round_s"]) == 2 and all(s > 0 for s in r["round_s"])
        assert r["messages_per_round"] == max(int(8 * r["fraction"]), 2)
        assert r["startup_s"] > 0 and r["peak_rss_mb"] > 0 and r["rss_per_idle_client_kb"] >= 0
        assert r["upload_bytes"] > 0 and r["download_bytes"] > 0
    lean = [r for r in rows if r["strategy"] == "leanfed"]
    fed = [r for r in rows if r["strategy"] == "flower-fedavg"]
    # RigL at density 0.1 uploads a fraction of dense FedAvg's bytes for the same sample.
    assert max(r["upload_bytes"] for r in lean) < min(r["upload_bytes"] for r in fed)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["targets"]["bit_identical_workers_1_vs_2@8x0.5"] is True
    assert summary["targets"]["ray_leanfed_over_fedavg_round_s@8x0.5"] > 0
    assert (tmp_path / "round_time_vs_clients.png").stat().st_size > 0
    assert (tmp_path / "results.md").read_text().count("\n| ") == len(rows)
