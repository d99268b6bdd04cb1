"""Benchmark arms side by side: each arm in its own spawn process, on one torch thread.

An arm's result must depend on its own seed only. Intra-op threads change float results
(a parallel reduction sums in another order; measured: a different model after 20 DP-SGD
steps at 2 threads vs 1) and, on tiny per-example tensors, cost more than they save
(measured under load: 38 ms vs 193-256 ms CPU per record-level DP-SGD step, 1 vs 2
threads). So every arm runs on ONE thread, in process (``jobs=1``) or in a worker
(``jobs>1``): the rows are the same whatever the machine's core count or ``--jobs``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from typing import Any, TypeVar

import torch
from rich.console import Console

from simulations.grid import quiet_flower

__all__ = ["run_jobs"]

T = TypeVar("T")
console = Console(stderr=True)


def _init_worker() -> None:
    torch.set_num_threads(1)
    quiet_flower()


def run_jobs(
    fn: Callable[..., T], arms: Sequence[tuple[Any, ...]], jobs: int = 1, label: str = "arm"
) -> list[T]:
    """``[fn(*a) for a in arms]``, ``jobs`` at a time; ``fn`` must be a module-level function."""
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        if jobs == 1 or len(arms) <= 1:
            out = []
            for i, a in enumerate(arms):
                console.print(f"{label} {i + 1}/{len(arms)}")
                out.append(fn(*a))
            return out
        done: dict[int, T] = {}
        with ProcessPoolExecutor(
            min(jobs, len(arms)), mp_context=get_context("spawn"), initializer=_init_worker
        ) as pool:
            futures = {pool.submit(fn, *a): i for i, a in enumerate(arms)}
            for f in as_completed(futures):
                done[futures[f]] = f.result()
                console.print(f"{label} {futures[f] + 1}/{len(arms)} done ({len(done)} so far)")
        return [done[i] for i in range(len(arms))]
    finally:
        torch.set_num_threads(threads)
