"""The real `flwr run` path: leanfed as a FAB on a local simulation SuperLink (Ray backend).

We start `flower-superlink --insecure --simulation` ourselves (so we hold its pid) rather
than using the CLI's ":local:" address, which would leave a detached SuperLink daemon on a
fixed port behind. The Ray backend is held to the 2 CPUs of the test machine through
`--federation-config` (Flower 1.42's replacement for the deprecated `options.` keys).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from server.security import flower, processes

REPO = Path(__file__).resolve().parents[1]

# One tiny round on two simulated SuperNodes.
RUN_CONFIG = [
    "num-server-rounds=1 local.steps=2 num-partitions=2 min-train-nodes=2 fraction-train=1.0"
]
# 2 SuperNodes, 1 CPU per ClientApp actor, Ray may use 2 CPUs in all.
FEDERATION_CONFIG = ["num-supernodes=2 client-resources-num-cpus=1 init-args-num-cpus=2"]
RUN_TIMEOUT_S = 180.0


def _flower_installed() -> bool:
    sim = ("flwr", "flower-superlink", "flower-superexec", "flwr-simulation")
    return flower.flower_installed(sim)


def run_simulation(
    app_src: Path,
    work: Path,
    *,
    run_config: list[str],
    federation_config: list[str],
    timeout: float = RUN_TIMEOUT_S,
) -> tuple[processes.CliResult, str]:
    """`flwr run APP local --stream` on a simulation SuperLink we start and stop by pid.

    Returns the CLI result and the run's final status reported by the SuperLink.
    """
    home = work / "flwr-home"
    app = flower.copy_app(app_src, work / "app")
    env = flower.flwr_env(home)
    # The ServerApp records the run; keep its SQLite store out of the repository.
    env["LEANFED_DB_URL"] = f"sqlite:///{work / 'runs.db'}"
    port = processes.free_port()
    flower.write_connection(home, "local-sim", f"127.0.0.1:{port}", insecure=True)
    superlink = processes.start_process(
        flower.superlink_command(port, None, simulation=True),
        work / "superlink.log",
        env=env,
        cwd=work,
    )
    try:
        processes.wait_for_health(f"127.0.0.1:{port}", proc=superlink, timeout=60)
        cmd = ["flwr", "run", str(app), "local-sim", "--stream"]
        for item in run_config:
            cmd += ["--run-config", item]
        for item in federation_config:
            cmd += ["--federation-config", item]
        log = work / "flwr-run.log"
        result = processes.run_logged(cmd, log, env=env, timeout=timeout, cwd=work)
        if result.returncode != 0:  # e.g. the FAB could not be built: nothing was started
            return result, "not started"
        run_id = flower.started_run_id(result.output)
        return result, flower.run_status("local-sim", run_id, env=env)
    finally:
        processes.stop_process(superlink)


def _logs(work: Path) -> str:
    return "\n".join(
        f"--- {p.name}\n{p.read_text(errors='replace')[-4000:]}" for p in sorted(work.glob("*.log"))
    )


@pytest.mark.flwr_run
@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.skipif(not _flower_installed(), reason="Flower CLI executables not installed")
def test_flwr_run_local_simulation(tmp_path: Path) -> None:
    result, status = run_simulation(
        REPO, tmp_path, run_config=RUN_CONFIG, federation_config=FEDERATION_CONFIG
    )
    assert result.returncode == 0, _logs(tmp_path)
    assert status == "finished:completed", _logs(tmp_path)
    # The streamed ServerApp log shows the one round and its aggregation finishing.
    assert "[ROUND 1/1]" in result.output, _logs(tmp_path)
    # leanfed's strategy logs its aggregated MetricRecord: both replies accepted, none rejected.
    assert "'num_accepted': 2" in result.output, _logs(tmp_path)
    assert "'num_rejected': 0" in result.output, _logs(tmp_path)
    assert "rejected node" not in result.output, _logs(tmp_path)
    assert "Traceback" not in result.output, _logs(tmp_path)


@pytest.mark.flwr_run
@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.skipif(not _flower_installed(), reason="Flower CLI executables not installed")
def test_flwr_run_user_model_and_stateful_fedadam(tmp_path: Path) -> None:
    """README "Bring your own": a user's model (shipped inside the app, examples/**) and the
    stateful FedAdam rule run through `flwr run` unchanged; FedAdam's state is checkpointed."""
    import io

    import torch

    from server.store import RunStore

    plugins = 'model="examples.my_plugins:tiny_net" aggregation.rule="fedadam" dataset="digits"'
    result, status = run_simulation(
        REPO,
        tmp_path,
        run_config=[f"{RUN_CONFIG[0]} {plugins}"],
        federation_config=FEDERATION_CONFIG,
    )
    assert result.returncode == 0, _logs(tmp_path)
    assert status == "finished:completed", _logs(tmp_path)
    assert "merge fedadam" in result.output, _logs(tmp_path)
    with RunStore(f"sqlite:///{tmp_path / 'runs.db'}") as store:
        (run,) = store.list_runs()
        assert run.config["model"] == "examples.my_plugins:tiny_net"
        latest = store.latest_checkpoint(run.id)
    assert latest is not None
    ck = torch.load(io.BytesIO(latest[1]), weights_only=True)
    assert set(ck["rule_state"]) == {"m", "v"} and ck["rule_state"]["m"]
