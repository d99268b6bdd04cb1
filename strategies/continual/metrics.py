"""CL metrics from the accuracy matrix: ACC, BWT, FWT, forgetting (GEM, Chaudhry, Avalanche).

R is a T x T array, R[i, j] = accuracy on task j's test set after training experience i
(0-based). b is the accuracy of a randomly initialised model on each task ([T]).
All functions accept ``after=i`` to score the stream as it stood after experience i
(rows 0..i, tasks 0..i), which is what a per-round dashboard shows; default i = T-1.

Definitions (k = after, all sums 0-based):

- average accuracy (Lopez-Paz & Ranzato 2017, GEM): ACC = 1/(k+1) sum_{j<=k} R[k, j]
- GEM backward transfer: BWT = 1/k sum_{j<k} (R[k, j] - R[j, j])
- GEM forward transfer:  FWT = 1/k sum_{1<=j<=k} (R[j-1, j] - b[j])
- Chaudhry et al. 2018 (RWalk) forgetting:
  F = 1/k sum_{j<k} (max_{l<k} R[l, j] - R[k, j])
  (max over every earlier row, literally as in the paper; rows l < j, i.e. before task j
  was trained, count only if they were evaluated (not NaN). A task's best accuracy may
  come after its own experience through positive backward transfer.)
- Avalanche ``StreamForgetting``: the accuracy on experience j the first time it was
  evaluated right after training on it, minus the current accuracy, averaged over the
  experiences trained before the current one: 1/k sum_{j<k} (R[j, j] - R[k, j]).
- Avalanche BWT (``StreamBWT``) = - Avalanche forgetting.
- Avalanche ``StreamForwardTransfer``: accuracy on j evaluated after training experience
  j-1 minus the accuracy of the *same model at its initialisation* on j:
  1/k sum_{1<=j<=k} (R[j-1, j] - b[j]).

How they differ: on a complete matrix GEM BWT == Avalanche BWT == -Avalanche forgetting,
and GEM FWT == Avalanche FWT when b is the same vector. They part ways where
(1) Chaudhry uses the *best* earlier accuracy, not the accuracy right after training, so
Chaudhry forgetting >= Avalanche forgetting, with equality iff R[j, j] is the column max
over rows < k; (2) GEM's b is "a random-init model" (any seed), Avalanche's is the
evaluation of the very initial weights of the trained model; (3) Avalanche reports the
stream values at every evaluation (our ``after=i``) and skips experiences not trained yet.
"""

from __future__ import annotations

import numpy as np


def _check(r: np.ndarray, after: int | None) -> tuple[np.ndarray, int]:
    r = np.asarray(r, dtype=np.float64)
    if r.ndim != 2 or r.shape[0] != r.shape[1]:
        raise ValueError(f"accuracy matrix must be square T x T, got shape {r.shape}")
    t = r.shape[0]
    if t == 0:
        raise ValueError("accuracy matrix is empty")
    k = t - 1 if after is None else after
    if not 0 <= k < t:
        raise ValueError(f"after={after} out of range for {t} experiences")
    return r, k


def _need(r: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> None:
    """Raise naming the first missing (NaN) entry among R[rows, cols] (broadcast)."""
    rr, cc = np.broadcast_arrays(rows, cols)
    bad = np.isnan(r[rr, cc])
    if bad.any():
        i, j = int(rr[bad].flat[0]), int(cc[bad].flat[0])
        raise ValueError(f"accuracy matrix entry R[{i}, {j}] is missing (NaN)")


def _baseline(b: np.ndarray | None, t: int) -> np.ndarray:
    if b is None:
        raise ValueError("forward transfer needs the random-init baseline accuracies b")
    b = np.asarray(b, dtype=np.float64)
    if b.shape != (t,):
        raise ValueError(f"baseline b must have shape ({t},), got {b.shape}")
    return b


def average_accuracy(r: np.ndarray, after: int | None = None) -> float:
    """ACC: mean accuracy over tasks 0..k after experience k (final row mean by default)."""
    r, k = _check(r, after)
    _need(r, np.array(k), np.arange(k + 1))
    return float(r[k, : k + 1].mean())


def bwt_gem(r: np.ndarray, after: int | None = None) -> float:
    """GEM backward transfer 1/k sum_{j<k} (R[k,j] - R[j,j]); 0.0 when k = 0 (undefined)."""
    r, k = _check(r, after)
    if k == 0:
        return 0.0
    j = np.arange(k)
    _need(r, np.array(k), j)
    _need(r, j, j)
    return float((r[k, j] - r[j, j]).mean())


def fwt_gem(r: np.ndarray, b: np.ndarray | None, after: int | None = None) -> float:
    """GEM forward transfer 1/k sum_{1<=j<=k} (R[j-1,j] - b[j]); 0.0 when k = 0."""
    r, k = _check(r, after)
    base = _baseline(b, r.shape[0])
    if k == 0:
        return 0.0
    j = np.arange(1, k + 1)
    _need(r, j - 1, j)
    return float((r[j - 1, j] - base[j]).mean())


def forgetting_chaudhry(r: np.ndarray, after: int | None = None) -> float:
    """Chaudhry et al. 2018: 1/k sum_{j<k} (max_{l<k} R[l,j] - R[k,j]); 0.0 when k = 0."""
    r, k = _check(r, after)
    if k == 0:
        return 0.0
    return float(per_task_forgetting_chaudhry(r, k).mean())


def per_task_forgetting_chaudhry(r: np.ndarray, after: int | None = None) -> np.ndarray:
    """f_j for j < k (Chaudhry et al. 2018), shape [k]."""
    r, k = _check(r, after)
    j = np.arange(k)
    for task in range(k):  # rows task..k-1 (trained on it) must exist; earlier rows may be NaN
        _need(r, np.arange(task, k), np.array(task))
    _need(r, np.array(k), j)
    best = np.nanmax(r[:k, :k], axis=0)  # [k] best accuracy over earlier rows l < k
    return best - r[k, :k]


def forgetting_avalanche(r: np.ndarray, after: int | None = None) -> float:
    """Avalanche StreamForgetting: 1/k sum_{j<k} (R[j,j] - R[k,j]); 0.0 when k = 0.

    Term by term this is minus GEM's backward transfer, so it is computed as one.
    """
    return -bwt_gem(r, after)


def bwt_avalanche(r: np.ndarray, after: int | None = None) -> float:
    """Avalanche StreamBWT = -StreamForgetting."""
    return -forgetting_avalanche(r, after)


def forward_transfer_avalanche(
    r: np.ndarray, b_init: np.ndarray | None, after: int | None = None
) -> float:
    """Avalanche StreamForwardTransfer: 1/k sum_{1<=j<=k} (R[j-1,j] - b_init[j]).

    ``b_init`` is the accuracy of the model's own initial weights (evaluated before
    the first experience), not an independent random model.
    """
    return fwt_gem(r, b_init, after)


class AccuracyMatrix:
    """Accumulates R row by row as experiences finish; NaN marks not-yet-evaluated entries."""

    def __init__(self, num_tasks: int) -> None:
        if num_tasks < 1:
            raise ValueError(f"num_tasks must be >= 1, got {num_tasks}")
        self.r = np.full((num_tasks, num_tasks), np.nan)
        self.baseline = np.full(num_tasks, np.nan)

    @property
    def num_tasks(self) -> int:
        return int(self.r.shape[0])

    def record(self, after: int, task: int, accuracy: float) -> None:
        """R[after, task] = accuracy (in [0, 1])."""
        if not (0 <= after < self.num_tasks and 0 <= task < self.num_tasks):
            t = self.num_tasks
            raise ValueError(f"R[{after}, {task}] outside a {t}x{t} matrix")
        if not 0.0 <= accuracy <= 1.0:
            raise ValueError(f"accuracy must be in [0, 1], got {accuracy}")
        self.r[after, task] = accuracy

    def record_baseline(self, task: int, accuracy: float) -> None:
        if not 0 <= task < self.num_tasks:
            raise ValueError(f"baseline task {task} outside {self.num_tasks} tasks")
        if not 0.0 <= accuracy <= 1.0:
            raise ValueError(f"accuracy must be in [0, 1], got {accuracy}")
        self.baseline[task] = accuracy

    def summary(self, after: int | None = None) -> dict[str, float]:
        """All scalar metrics after experience ``after`` (FWT only when b is complete)."""
        out = {
            "acc": average_accuracy(self.r, after),
            "bwt_gem": bwt_gem(self.r, after),
            "forgetting_chaudhry": forgetting_chaudhry(self.r, after),
            "forgetting_avalanche": forgetting_avalanche(self.r, after),
            "bwt_avalanche": bwt_avalanche(self.r, after),
        }
        if not np.isnan(self.baseline).any():
            out["fwt_gem"] = fwt_gem(self.r, self.baseline, after)
            out["fwt_avalanche"] = forward_transfer_avalanche(self.r, self.baseline, after)
        return out

    def to_list(self) -> list[list[float | None]]:
        """JSON-friendly rows (None for missing entries), for the run store."""
        return [[None if np.isnan(v) else float(v) for v in row] for row in self.r]
