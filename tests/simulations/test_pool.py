"""The embedded engine's worker pool: workers exit when their driver is killed."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

# A driver that starts a 2-worker pool, prints the workers' pids, then waits to be killed.
# Its ClientApp is an empty one: how a worker follows its driver does not depend on the
# app, and leanfed's client.app costs seconds of imports in the driver and in each worker.
DRIVER = """
import sys, time
from simulations.pool import WorkerPool
pool = WorkerPool("empty_client_app:app", {}, 2)
print(" ".join(str(p) for p in pool.start()), flush=True)
time.sleep(600)
"""
EMPTY_APP = "from flwr.clientapp import ClientApp\n\napp = ClientApp()\n"


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.parametrize("reaped", [True, False], ids=["reaped", "zombie"])
def test_workers_exit_when_the_driver_is_sigkilled(reaped: bool, tmp_path: Path) -> None:
    # Under forkserver a worker's parent is the fork server, not the driver: a worker
    # that watched getppid() outlived a SIGKILLed driver (seen: orphaned workers).
    (tmp_path / "empty_client_app.py").write_text(EMPTY_APP)
    path = os.pathsep.join([str(Path(__file__).resolve().parents[2]), str(tmp_path)])
    env = {**os.environ, "PYTHONPATH": path}
    driver = subprocess.Popen(
        [sys.executable, "-c", DRIVER], stdout=subprocess.PIPE, text=True, env=env
    )
    workers: list[int] = []
    try:
        assert driver.stdout is not None
        workers = [int(p) for p in driver.stdout.readline().split()]
        assert len(workers) == 2 and all(_alive(p) for p in workers)
        os.kill(driver.pid, signal.SIGKILL)
        if reaped:
            driver.wait()
        # else the killed driver stays a zombie until the end (nobody waits for it): its
        # workers must still see it as dead (they waited for the reap before).
        # Hang guard only (no timing claim): a worker polls its driver once a second.
        for _ in range(600):
            if not any(_alive(p) for p in workers):
                break
            time.sleep(0.1)
        assert not any(_alive(p) for p in workers)
    finally:
        with contextlib.suppress(subprocess.TimeoutExpired):
            driver.wait(timeout=0)
        if driver.poll() is None:
            driver.kill()
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize(
    ("n", "workers", "want"),
    [
        (0, 2, []),
        (1, 2, [1]),
        (5, 2, [1, 1, 1, 1, 1]),
        (100, 2, [1, 1, 2, 2] + [3] * 31 + [1]),
        (1000, 2, [1, 1, 2, 2] + [16] * 62 + [2]),
        (100, 4, [1, 1, 1, 1, 1, 1, 1, 1] + [1] * 92),
    ],
)
def test_chunk_sizes_ramp_up_then_cover_every_job_once(
    n: int, workers: int, want: list[int]
) -> None:
    from simulations.pool import chunk_sizes

    assert chunk_sizes(n, workers) == want
    assert sum(want) == n
