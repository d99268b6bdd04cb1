"""One measured cell of `leanfed bench scale`: a recorded run on one engine, in a fresh process.

Run as ``python -m simulations.scale_cell SPEC_JSON OUT_JSON``. A fresh process per cell
keeps start-up honest (imports, worker or Ray start) and peak memory per cell. Memory is
the summed RSS of this process and all its descendants (workers, Ray's raylet, GCS and
actors), sampled every 0.2 s; shared pages count once per process, so it overstates.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import torch

from server.runner import RoundRecord, RunSummary
from server.session import run_recorded
from server.store import RunStore
from simulations.grid import InProcessGrid, quiet_flower
from tasks.config import LeanfedConfig


class TreeRss:
    """Peak of the summed RSS of a process tree, sampled on a background thread."""

    def __init__(self, interval: float = 0.2) -> None:
        self.root = psutil.Process()
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, args=(interval,), daemon=True)

    def now(self) -> int:
        total = 0
        for p in [self.root, *self.root.children(recursive=True)]:
            # A process may end between listing and reading it.
            with contextlib.suppress(psutil.Error):
                total += p.memory_info().rss
        return total

    def _loop(self, interval: float) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.now())
            self._stop.wait(interval)

    def __enter__(self) -> TreeRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.now())


def state_sha256(state: dict[str, torch.Tensor] | None) -> str:
    """SHA-256 over the final global model (names and raw bytes, in name order)."""
    h = hashlib.sha256()
    for k in sorted(state or {}):
        h.update(k.encode())
        h.update(state[k].detach().contiguous().numpy().tobytes())  # type: ignore[index]
    return h.hexdigest()


def sampled_per_round(cfg: LeanfedConfig) -> int:
    """Flower's sample size: max(int(n * fraction-train), min-train-nodes)."""
    return max(int(cfg.num_partitions * cfg.fraction_train), cfg.min_train_nodes)


def run_cell(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one (engine, config, workers) cell and measure it."""
    quiet_flower()
    cfg = LeanfedConfig.from_run_config(spec["config"])
    engine, workers = spec["engine"], int(spec["workers"])
    ends: list[float] = []
    records: list[RoundRecord] = []

    progress = Path(spec["progress"]) if spec.get("progress") else None

    def say(line: str) -> None:
        if progress is not None:  # the bench tails this file while the cell runs
            with progress.open("a") as f:
                f.write(line + "\n")

    def on_round(rec: RoundRecord) -> None:
        ends.append(time.perf_counter())
        records.append(rec)
        say(f"round {rec.round}/{cfg.num_server_rounds}: {rec.wall_s:.2f} s")

    proc = psutil.Process()
    extra: dict[str, Any] = {}
    with (
        tempfile.TemporaryDirectory(prefix="leanfed-scale-") as tmp,
        TreeRss() as rss,
        RunStore(f"sqlite:///{Path(tmp) / 'runs.db'}") as store,
    ):
        driver_before = proc.memory_info().rss
        t0 = time.perf_counter()
        summary: RunSummary
        if engine == "ray":
            from simulations.ray_engine import run_on_ray

            _, summary = run_on_ray(cfg, store, on_round=on_round, num_cpus=workers)
        else:
            with InProcessGrid(
                "client.app:app", cfg.num_partitions, cfg.to_run_config(), workers=workers
            ) as grid:
                grid.start()
                say(f"{workers} worker(s) started in {time.perf_counter() - t0:.1f} s")
                _, summary = run_recorded(grid, cfg, store, on_round=on_round)
                held = [len(grid.state_bytes(n)) for n in grid.node_ids]
                extra["state_bytes_per_client"] = statistics.fmean(held)
                extra["state_bytes_max"] = max(held)
        driver_after = proc.memory_info().rss
    round_s = [r.wall_s for r in records]
    n_msg = sampled_per_round(cfg)
    return {
        **spec["labels"],
        "engine": engine,
        "workers": workers,
        "clients": cfg.num_partitions,
        "fraction": cfg.fraction_train,
        "rounds": len(records),
        "messages_per_round": n_msg,
        "round_s": round_s,
        "round_s_median": statistics.median(round_s),
        "round_s_min": min(round_s),
        "round_s_max": max(round_s),
        "messages_per_s": n_msg / statistics.median(round_s),
        # Engine and worker start, server model, initial evaluation: all before round 1.
        "startup_s": ends[0] - t0 - records[0].wall_s,
        "total_s": ends[-1] - t0,
        "peak_rss_mb": rss.peak / 2**20,
        # Upper bound: driver growth over the run per client, server buffers included.
        "rss_per_idle_client_kb": max(0, driver_after - driver_before) / cfg.num_partitions / 1024,
        "final_accuracy": summary.final_accuracy,
        "model_sha256": state_sha256(summary.final_state),
        "upload_bytes": sum(r.upload_bytes for r in records),
        "download_bytes": sum(r.download_bytes for r in records),
        **extra,
    }


def main(argv: list[str]) -> int:
    spec = json.loads(Path(argv[0]).read_text())
    Path(argv[1]).write_text(json.dumps(run_cell(spec)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
