"""Flower's Ray engine: node run configs; a recorded run on a two-node Ray cluster on loopback."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from flwr.common.config import get_fused_config_from_dir

from server.store import RunStore
from simulations.ray_engine import write_app_dir
from tasks.config import LeanfedConfig

CONFIG = """
num-server-rounds = 2
dataset = "digits"
model = "mlp"
num-partitions = 6
fraction-train = 0.5
min-train-nodes = 3
local.steps = 2
local.batch-size = 16
dst.density = 0.2
"""


def test_every_node_gets_exactly_the_runs_config(tmp_path: Path) -> None:
    cfg = LeanfedConfig(dataset="digits", model="mlp", num_partitions=7, local_lr=0.125)
    run_config = cfg.to_run_config()
    # Flower's own fusion (what its engine does for each node's context.run_config).
    fused = get_fused_config_from_dir(write_app_dir(tmp_path, run_config), {})
    assert fused == run_config
    assert LeanfedConfig.from_run_config(dict(fused)) == cfg


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _ray_node(args: list[str], tmp: Path, log: str) -> subprocess.Popen[bytes]:
    """One `ray start --block` node: its PID owns the node's processes; ports all free ones."""
    ports = _free_ports(8)
    node_manager, object_manager, client, agent, metrics, runtime_env, agent_grpc, dash = ports
    cmd = [
        str(Path(sys.executable).with_name("ray")),
        "start",
        *args,
        "--num-cpus=1",
        "--node-ip-address=127.0.0.1",
        "--block",
        "--disable-usage-stats",
        f"--node-manager-port={node_manager}",
        f"--object-manager-port={object_manager}",
        f"--dashboard-agent-listen-port={agent}",
        f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--metrics-export-port={metrics}",
        f"--runtime-env-agent-port={runtime_env}",
    ]
    if "--head" in args:
        cmd += [
            "--include-dashboard=false",
            f"--dashboard-port={dash}",
            f"--ray-client-server-port={client}",
        ]
    with open(tmp / log, "wb") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Stop one node by PID: SIGTERM its `ray start --block`, then whatever it left behind."""
    try:
        family = [proc.pid, *(c.pid for c in psutil.Process(proc.pid).children(recursive=True))]
    except psutil.NoSuchProcess:
        family = [proc.pid]
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
    for pid in family[1:]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _forget_cluster(address: str) -> None:
    """`ray start --head` records its address for later ray.init() calls; stopping it by PID
    (not `ray stop`) leaves that file behind, so remove it when it names our cluster."""
    current = Path("/tmp/ray/ray_current_cluster")
    with contextlib.suppress(OSError):
        if current.read_text().strip().endswith(address.rsplit(":", 1)[1]):
            current.unlink()


def _wait_for_nodes(address: str, n: int, timeout: float = 120) -> None:
    ray = str(Path(sys.executable).with_name("ray"))
    deadline = time.monotonic() + timeout
    status = ""
    while time.monotonic() < deadline:
        res = subprocess.run(
            [ray, "status", f"--address={address}"], capture_output=True, text=True, timeout=60
        )
        status = res.stdout
        if status.count("node_") >= n and f"0.0/{n}.0 CPU" in status:
            return
        time.sleep(2)
    raise AssertionError(f"Ray cluster never showed {n} nodes:\n{status}")


@pytest.mark.slow
def test_recorded_run_on_a_two_node_ray_cluster(tmp_path: Path) -> None:
    (gcs_port,) = _free_ports(1)  # never Redis' 6379, Ray's default
    address = f"127.0.0.1:{gcs_port}"
    head = _ray_node(["--head", f"--port={gcs_port}"], tmp_path, "head.log")
    worker = None
    try:
        worker = _ray_node([f"--address={address}"], tmp_path, "worker.log")
        _wait_for_nodes(address, 2)
        conf = tmp_path / "tiny.toml"
        conf.write_text(CONFIG)
        url = f"sqlite:///{tmp_path / 'ray.db'}"
        repo = Path(__file__).resolve().parents[2]
        res = subprocess.run(
            [
                sys.executable, "-m", "simulations.cli", "simulate", "--no-progress",
                "--engine", "ray", "--ray-address", address, "--config", str(conf), "--db", url,
            ],
            cwd=repo, capture_output=True, text=True, timeout=600,
        )
        assert res.returncode == 0, res.stderr[-3000:]
    finally:
        for proc in (worker, head):
            if proc is not None:
                _stop(proc)
        _forget_cluster(address)
    with RunStore(url) as store:
        (run,) = store.list_runs()
        assert run.status == "completed"
        rounds = store.get_rounds(run.id)
        assert [r.round for r in rounds] == [1, 2]
        assert all(r.upload_bytes > 0 and r.download_bytes > 0 for r in rounds)
        clients = store.get_client_results(run.id)
        assert len(clients) == 2 * 3 and all(c.accepted for c in clients)
        assert store.latest_checkpoint(run.id) is not None
