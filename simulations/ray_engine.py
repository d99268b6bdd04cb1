"""Runs a recorded leanfed simulation on Flower's simulation engine (the Ray backend of `flwr run`).

The ServerApp (a closure around :func:`server.session.run_recorded`, so rounds go to the
same run store and the same progress callback) and the real ClientApp are handed to
Flower's simulation runtime, which keeps one ``Context`` per virtual SuperNode and runs
ClientApps on a pool of Ray actors. Ray runs locally, or joins an existing Ray cluster
(head + worker nodes) when given its address; every node of that cluster must be able to
import leanfed.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.common.constant import RUN_ID_NUM_BYTES, SUPERLINK_NODE_ID, TASK_ID_NUM_BYTES
from flwr.server.superlink.linkstate.utils import generate_rand_int_from_bytes
from flwr.serverapp import Grid, ServerApp
from flwr.simulation.run_simulation import _run_simulation
from flwr.supercore.constant import NOOP_FEDERATION_ID
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity
from flwr.supercore.telemetry import EventType

from client.app import app as client_app
from server.runner import RoundRecord, RunSummary
from server.security.signing import Signer
from server.session import run_recorded
from server.store import RunStore
from simulations.pool import freeze_startup_objects, torch_threads
from tasks.config import LeanfedConfig

RunConfig = dict[str, bool | float | int | str]


def _toml_value(v: bool | float | int | str) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return json.dumps(v)  # a TOML basic string: JSON's escapes are valid TOML escapes
    return repr(v)


def write_app_dir(directory: Path, run_config: RunConfig) -> Path:
    """A minimal Flower App directory whose defaults are this run's config.

    Flower's simulation runtime builds every node's ``context.run_config`` from the App's
    ``pyproject.toml`` defaults fused with the run's overrides (``flwr run`` reads the
    project's own file); a run started from Python has no project file, so write one.
    """
    lines = [
        "[project]",
        'name = "leanfed-simulation"',
        'version = "0.1.0"',
        "",
        "[tool.flwr.app]",
        'publisher = "leanfed"',
        "",
        "[tool.flwr.app.components]",
        'serverapp = "server.app:app"',
        'clientapp = "client.app:app"',
        "",
        "[tool.flwr.app.config]",
        *(f"{json.dumps(k)} = {_toml_value(v)}" for k, v in run_config.items()),
    ]
    path = directory / "pyproject.toml"
    path.write_text("\n".join(lines) + "\n")
    return directory


def ray_init(address: str | None, num_cpus: int | None) -> None:
    """Start a local Ray instance (``num_cpus`` CPUs) or connect to the cluster at ``address``.

    Flower's Ray backend initialises Ray only if nobody did; doing it here lets the
    caller time start-up and pass the worktree's import path to every worker.
    """
    import ray

    if ray.is_initialized():
        return
    # Silence Ray's notice about a future change to accelerator env vars (CPU-only here).
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    pythonpath = os.pathsep.join(p for p in sys.path if p)
    if os.environ.get("PYTHONPATH"):
        pythonpath = os.environ["PYTHONPATH"] + os.pathsep + pythonpath
    args: dict[str, Any] = {
        "include_dashboard": False,
        "logging_level": logging.WARNING,
        "log_to_driver": False,
        "runtime_env": {"env_vars": {"PYTHONPATH": pythonpath}},
    }
    if address:
        args["address"] = address
    else:
        args["address"] = "local"  # a new instance, never a cluster another job started
        args["num_cpus"] = num_cpus
    for attempt in range(3):
        try:
            ray.init(**args)
            return
        except Exception as exc:
            # Ray gives a new raylet 30 s (hard-coded) to register; on an overloaded
            # machine it may need longer: start again rather than fail the run.
            if "timed out during startup" not in str(exc) or attempt == 2:
                raise
            ray.shutdown()


def ray_shutdown() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


def run_on_ray(
    cfg: LeanfedConfig,
    store: RunStore,
    *,
    name: str | None = None,
    on_round: Callable[[RoundRecord], None] | None = None,
    address: str | None = None,
    num_cpus: int | None = None,
    signer: Signer | None = None,
) -> tuple[str, RunSummary]:
    """Run ``cfg`` on Flower's Ray engine, recorded in ``store``; return (run id, summary).

    Each simulated client asks Ray for one CPU, so the actor pool has one actor per
    CPU of the cluster (``num_cpus`` locally, the sum over nodes on a cluster).
    """
    out: dict[str, tuple[str, RunSummary]] = {}
    server = ServerApp()

    @server.main()
    def _main(grid: Grid, context: Context) -> None:
        out["result"] = run_recorded(
            grid,
            cfg,
            store,
            name=name,
            on_round=on_round,
            signer=signer,
            flower_run_id=grid.run.run_id,
        )

    ray_init(address, num_cpus)
    run_config = cfg.replace(resume="").to_run_config()
    run = Run.create_empty(run_id=generate_rand_int_from_bytes(RUN_ID_NUM_BYTES))
    run.primary_task_id = generate_rand_int_from_bytes(TASK_ID_NUM_BYTES)
    run.federation_id = NOOP_FEDERATION_ID
    run.override_config = dict(run_config)
    # The ServerApp runs in this process on Flower's thread; messages it builds read this.
    TaskIdentity.task_id = 1
    TaskIdentity.run_id = run.run_id
    TaskIdentity.node_id = SUPERLINK_NODE_ID
    backend_config: dict[str, Any] = {
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
        "init_args": {"logging_level": logging.WARNING, "log_to_driver": False},
    }
    freeze_startup_objects()  # as the embedded engine's driver and workers do
    try:
        # The ServerApp shares the cores with the actors (one CPU each): one torch thread.
        with torch_threads(1), tempfile.TemporaryDirectory(prefix="leanfed-ray-app-") as tmp:
            _run_simulation(
                num_supernodes=cfg.num_partitions,
                exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
                client_app=client_app,
                server_app=server,
                backend_name="ray",
                backend_config=backend_config,
                app_dir=str(write_app_dir(Path(tmp), run_config)),
                is_app=True,
                run=run,
            )
    finally:
        ray_shutdown()
    if "result" not in out:
        raise RuntimeError("Flower's simulation engine ended without finishing the run")
    return out["result"]
