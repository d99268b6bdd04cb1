"""ACC/BWT/FWT/forgetting of any recorded continual run, from its per-round task accuracies.

Row i of the accuracy matrix R is the server's evaluation of every task's test set at the
end of experience i, i.e. after round (i + 1) * cl.rounds-per-task (the `task_acc.J`
round metrics); the metrics are those of strategies.continual.metrics (GEM, Chaudhry,
Avalanche). Used by `leanfed simulate`'s summary, `leanfed runs show` and `leanfed report`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from strategies.continual.metrics import AccuracyMatrix

PREFIX = "task_acc."


def task_rows(round_metrics: Mapping[int, Mapping[str, float]]) -> dict[int, list[float]]:
    """{round: [acc on task 0, 1, ...]} from round metrics holding ``task_acc.J`` keys."""
    rows: dict[int, list[float]] = {}
    for rnd, metrics in round_metrics.items():
        accs = {int(k[len(PREFIX) :]): float(v) for k, v in metrics.items() if k.startswith(PREFIX)}
        if accs and sorted(accs) == list(range(len(accs))):
            rows[int(rnd)] = [accs[j] for j in range(len(accs))]
    return rows


def accuracy_matrix(
    rows: Mapping[int, Sequence[float]],
    rounds_per_task: int,
    baseline: Sequence[float] | None = None,
) -> tuple[AccuracyMatrix, int] | None:
    """R (rows of the experiences finished so far) and the last finished experience, or None."""
    if not rows or rounds_per_task < 1:
        return None
    num_tasks = len(next(iter(rows.values())))
    mat = AccuracyMatrix(num_tasks)
    last = -1
    for i in range(num_tasks):
        row = rows.get((i + 1) * rounds_per_task)
        if row is None or len(row) != num_tasks:
            break
        for j, acc in enumerate(row):
            mat.record(i, j, min(1.0, max(0.0, acc)))
        last = i
    if last < 0:
        return None
    if baseline is not None and len(baseline) == num_tasks:
        for j, acc in enumerate(baseline):
            mat.record_baseline(j, min(1.0, max(0.0, acc)))
    return mat, last


def cl_summary(
    rows: Mapping[int, Sequence[float]],
    rounds_per_task: int,
    baseline: Sequence[float] | None = None,
) -> dict[str, float]:
    """ACC, BWT, forgetting (and FWT with a baseline row) after the last finished experience."""
    found = accuracy_matrix(rows, rounds_per_task, baseline)
    if found is None:
        return {}
    mat, last = found
    return {k: float(v) for k, v in mat.summary(last).items()}


NAMES = {
    "acc": "ACC",
    "bwt_gem": "BWT",
    "fwt_gem": "FWT",
    "forgetting_chaudhry": "forgetting",
}


def format_cl(metrics: Mapping[str, float]) -> str:
    """One line: ACC, BWT (GEM), FWT (GEM, with a baseline) and forgetting (Chaudhry)."""
    return ", ".join(f"{label} {metrics[k]:.3f}" for k, label in NAMES.items() if k in metrics)
