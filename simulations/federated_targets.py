"""Issue 3 and issue 8 targets of `leanfed bench federated`, per task, from its result rows."""

from __future__ import annotations

from typing import Any


def accuracy_at_budget(row: dict[str, Any], budget: int) -> float:
    """Accuracy after the last round whose cumulative upload stays within ``budget`` bytes."""
    acc, spent = row["initial_accuracy"], 0
    for a, b in zip(row["accuracy_per_round"], row["upload_bytes_per_round"], strict=True):
        spent += b
        if spent > budget:
            break
        acc = a
    return float(acc)


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def _versus_dense(r: dict[str, Any], dense: dict[str, Any]) -> dict[str, Any]:
    """Accuracy gap (points), client training / round wall / upload / download ratios."""
    return {
        "accuracy_gap_points": 100 * (r["final_accuracy"] - dense["final_accuracy"]),
        "client_train_ratio": _ratio(r["client_train_s"], dense["client_train_s"]),
        "median_round_wall_ratio": _ratio(r["median_round_wall_s"], dense["median_round_wall_s"]),
        "upload_ratio": r["upload_bytes"] / dense["upload_bytes"],
        "download_ratio": r["download_bytes"] / dense["download_bytes"],
    }


def structured_targets(rows: list[dict[str, Any]], dense: dict[str, Any]) -> dict[str, Any]:
    """Issue 8: channel rows (masked, condensed) vs dense FedAvg; mixed capacity vs all-full."""
    out: dict[str, Any] = {}
    full = {r["density"]: r for r in rows if r["condensed"] and r["low_capacity"] == 1.0}
    for r in rows:
        if r["rule"] != "channel":
            continue
        kind = "condensed" if r["condensed"] else "masked"
        key = f"channel-{r['density']:g}-{kind}" + (
            f"-mixed{r['low_capacity']:g}" if r["low_capacity"] < 1.0 else ""
        )
        out[key] = _versus_dense(r, dense)
        if r["low_capacity"] < 1.0 and r["density"] in full:
            gap = r["final_accuracy"] - full[r["density"]]["final_accuracy"]
            out[key]["gap_vs_full_capacity_points"] = 100 * gap
    return out


def task_targets(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """One task's rows: FedDST at density 0.1 (each upload dtype) and the structured rows."""
    dense = next(r for r in rows if r["strategy"] == "flower-fedavg")
    out: dict[str, Any] = structured_targets(rows, dense)
    for r in rows:
        if r["rule"] != "rigl" or r["density"] != 0.1:
            continue
        out[f"feddst-0.1-{r['upload_dtype']}"] = {
            **_versus_dense(r, dense),
            "equal_budget_gain_points": 100
            * (r["final_accuracy"] - accuracy_at_budget(dense, r["upload_bytes"])),
        }
    return out


def targets(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """``{task: task_targets(that task's rows)}``, tasks in row order; each has a dense row."""
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    return {t: task_targets([r for r in rows if r["task"] == t]) for t in tasks}
