"""The hospital walkthrough on localhost: the hardened deployment of deploy/README.md.

A TLS SuperLink with SuperNode auth listens on loopback for the operator; nginx (when
installed) exposes only its Fleet API to the sites; the operator's signing key signs the
app (served to the SuperLink by leanfed's app registry) and every checkpoint; two sites
with ``--trusted-entities`` each read only their own NPZ file (``--node-config
data-path=...``), authenticate with their own registered EC key and trust our CA. A third
SuperNode whose key was never registered must be refused. Every process is started in its
own session with a per-run tag in its environment and stopped by pid in ``finally``: first
each process with what it spawned, then anything still carrying the tag (a Flower child
orphaned by a crash), so a failing run leaves nothing behind.
"""

from __future__ import annotations

import subprocess
import uuid
from pathlib import Path

import numpy as np
import pytest

from server.security import flower, node_keys, processes
from server.security import tls as tls_files
from server.security.apps import AppRegistry, sign_app_dir, write_trusted_entities
from server.security.checkpoints import verify_run
from server.security.proxy import nginx_binary, write_proxy
from server.security.signing import generate_signing_key, load_signer, load_verifier
from server.store import RunStore

REPO = Path(__file__).resolve().parents[3]  # the repository root: the Flower App
CONNECTION = "site-link"
DATASET = "digits"  # sklearn's 8x8 digits: shipped with sklearn, small enough for 2 cores
RUN_CONFIG = [
    f"num-server-rounds=1 local.steps=2 num-partitions=2 min-train-nodes=2 fraction-train=1.0 "
    f'dataset="{DATASET}" model="mlp"'
]
RUN_TIMEOUT_S = 180.0


def _flower_installed() -> bool:
    return flower.flower_installed()


def write_site_files(out: Path, dataset: str, sites: int) -> list[Path]:
    """Split a shipped dataset into per-site NPZ files (keys x_train, y_train, x_test, y_test).

    Round-robin over the label-sorted order so every site holds every class, as the
    server builds its model for the dataset's full label set.
    """
    from tasks.datasets import load_dataset

    ds = load_dataset(dataset, seed=0)
    out.mkdir(parents=True, exist_ok=True)
    tr, te = np.argsort(ds.y_train, kind="stable"), np.argsort(ds.y_test, kind="stable")
    paths = []
    for i in range(sites):
        path = out / f"site-{i}.npz"
        np.savez(
            path,
            x_train=ds.x_train[tr[i::sites]],
            y_train=ds.y_train[tr[i::sites]],
            x_test=ds.x_test[te[i::sites]],
            y_test=ds.y_test[te[i::sites]],
        )
        paths.append(path)
    return paths


def _register(public_key: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["flwr", "supernode", "register", str(public_key), CONNECTION],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _logs(work: Path) -> str:
    return "\n".join(
        f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in sorted(work.glob("*.log"))
    )


def deploy_and_run(
    app_src: Path,
    work: Path,
    node_configs: list[dict[str, object]],
    run_config: list[str],
    intruder: bool = True,
) -> dict[str, object]:
    """Bring up a TLS + node-auth federation on localhost, run the app once, tear it down.

    Returns what the assertions need: the flwr run result, the run status, the exit code
    and log of the unregistered SuperNode (when ``intruder``), and the tag every started
    process carried.
    """
    home = work / "flwr-home"
    tag = uuid.uuid4().hex
    env = processes.tagged_env(flower.flwr_env(home), tag)
    # The ServerApp records the run; keep its SQLite store out of the repository. The
    # signing key reaches it through the SuperLink's environment, never the run config.
    env["LEANFED_DB_URL"] = f"sqlite:///{work / 'runs.db'}"
    signing = generate_signing_key(work / "signing")
    env["LEANFED_SIGNING_KEY"] = str(signing.private_key)
    tls = tls_files.generate_tls(work / "certs")
    keys = node_keys.generate_node_keys(work / "keys", len(node_configs) + 1)
    app = flower.copy_app(app_src, work / "app")
    # The operator signs the app; sites trust only the operator's key.
    signed = sign_app_dir(app, work / "registry", load_signer(signing.private_key))
    trusted = write_trusted_entities(work / "trusted.yaml", [signing.public_key])
    port = processes.free_port()
    address = f"127.0.0.1:{port}"  # the operator's (loopback) address
    flower.write_connection(home, CONNECTION, address, root_certificates=tls.ca_cert)
    nginx = nginx_binary()
    site_address = f"127.0.0.1:{processes.free_port()}" if nginx else address

    procs: list[subprocess.Popen[bytes]] = []
    out: dict[str, object] = {"signing_key": signing.public_key, "proxied": bool(nginx)}
    out["tag"] = tag
    registry = AppRegistry(work / "registry").start()
    try:
        env["FLWR_SUPERGRID_API_URL"] = registry.api_url
        superlink = processes.start_process(
            flower.superlink_command(port, tls, supernode_auth=True),
            work / "superlink.log",
            env=env,
            cwd=work,
        )
        procs.append(superlink)
        processes.wait_for_health(address, ca_cert=tls.ca_cert, proc=superlink, timeout=60)
        if nginx:  # sites reach the Fleet API only, through the proxy
            proxy = write_proxy(work / "proxy", site_address, address, tls)
            nginx_env = processes.tagged_env(None, tag)
            procs.append(
                processes.start_process(proxy.command(nginx), work / "nginx.log", env=nginx_env)
            )
            processes.wait_for_health(site_address, ca_cert=tls.ca_cert, proc=procs[-1])

        for pair in keys[:-1]:
            reg = _register(pair.public_key, env)
            assert reg.returncode == 0, reg.stdout + reg.stderr + _logs(work)
            assert "registered successfully" in reg.stdout, reg.stdout

        for i, (pair, node_config) in enumerate(zip(keys[:-1], node_configs, strict=True)):
            cmd = flower.supernode_command(
                site_address,
                processes.free_port(),
                node_config,
                ca_cert=tls.ca_cert,
                private_key=pair.private_key,
                trusted_entities=trusted,
            )
            log = work / f"supernode-{i}.log"
            procs.append(processes.start_process(cmd, log, env=env, cwd=work))

        # The intruder: valid TLS trust, but its public key was never registered.
        if intruder:
            intruder_proc = processes.start_process(
                flower.supernode_command(
                    site_address,
                    processes.free_port(),
                    {"data-path": str(work / "nowhere.npz")},
                    ca_cert=tls.ca_cert,
                    private_key=keys[-1].private_key,
                    max_retries=0,
                    max_wait_time=20,
                ),
                work / "supernode-unregistered.log",
                env=env,
                cwd=work,
            )
            procs.append(intruder_proc)
            try:
                out["intruder_code"] = intruder_proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                out["intruder_code"] = None

        cmd = ["flwr", "run", signed.spec, CONNECTION, "--stream"]
        for item in run_config:
            cmd += ["--run-config", item]
        result = processes.run_logged(
            cmd, work / "flwr-run.log", env=env, timeout=RUN_TIMEOUT_S, cwd=work
        )
        out["result"] = result
        out["flower_run_id"] = (
            flower.started_run_id(result.output) if result.returncode == 0 else None
        )
        out["status"] = (
            flower.run_status(CONNECTION, flower.started_run_id(result.output), env=env)
            if result.returncode == 0
            else "not started"
        )
    finally:
        try:
            for proc in reversed(procs):
                processes.stop_process(proc)
        finally:  # what stop_process could not reach: orphans that left the process tree
            out["leftover_pids"] = processes.stop_tagged(tag)
            registry.stop()
    if intruder:
        out["intruder_log"] = (work / "supernode-unregistered.log").read_text(errors="replace")
    out["superlink_log"] = (work / "superlink.log").read_text(errors="replace")
    return out


@pytest.mark.slow
@pytest.mark.timeout(480)
@pytest.mark.skipif(not _flower_installed(), reason="Flower CLI executables not installed")
def test_tls_deployment_with_supernode_auth(tmp_path: Path) -> None:
    sites = write_site_files(tmp_path / "sites", DATASET, 2)
    # No partition-id in the node config: a ClientApp that ignored data-path would raise
    # (client/data.py), so two accepted replies mean each site trained on its own file.
    out = deploy_and_run(
        REPO, tmp_path, [{"data-path": str(p)} for p in sites], run_config=RUN_CONFIG
    )
    result = out["result"]
    assert isinstance(result, processes.CliResult)
    assert result.returncode == 0, _logs(tmp_path)
    assert out["status"] == "finished:completed", _logs(tmp_path)
    # leanfed's strategy logs its aggregated MetricRecord: both replies accepted, none rejected.
    assert "'num_accepted': 2" in result.output, _logs(tmp_path)
    assert "'num_rejected': 0" in result.output, _logs(tmp_path)
    assert "rejected node" not in result.output, _logs(tmp_path)
    for i in range(2):
        site_log = (tmp_path / f"supernode-{i}.log").read_text(errors="replace")
        assert "Sent successfully" in site_log, _logs(tmp_path)
        assert "FAB verification failed" not in site_log, _logs(tmp_path)
    if out["proxied"]:
        access = (tmp_path / "proxy" / "access.log").read_text()
        assert "POST /v1/fleet/push-messages" in access, _logs(tmp_path)

    # The store links Flower's run id to the leanfed run, whose checkpoints verify.
    with RunStore(f"sqlite:///{tmp_path / 'runs.db'}") as store:
        (run,) = store.list_runs()
        assert run.flower_run_id == str(out["flower_run_id"]) and run.status == "completed"
        verifier = load_verifier(Path(str(out["signing_key"])))
        assert run.signing_key_id == verifier.key_id
        assert verify_run(store, run.id, verifier) == 1
        assert [c.accepted for c in store.get_client_results(run.id, 1)] == [True, True]

    # The unregistered SuperNode is refused at activation and gives up.
    assert out["intruder_code"] not in (None, 0), _logs(tmp_path)
    assert "Failed to activate SuperNode" in str(out["intruder_log"]), _logs(tmp_path)
    assert "No SuperNode found with the given public key" in str(out["superlink_log"])
    assert processes.tagged_pids(str(out["tag"])) == []  # nothing left running
