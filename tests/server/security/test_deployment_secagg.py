"""SecAgg+ over the real TLS + SuperNode-auth deployment (through nginx when installed)."""

from __future__ import annotations

from pathlib import Path

import pytest
import test_deployment  # the same directory: pytest puts it on sys.path
from test_deployment import DATASET, REPO, RUN_CONFIG, _logs, deploy_and_run, write_site_files

from server.security import flower, processes
from strategies.privacy.accountant import epsilon

# secagg+dp-client: each site adds its noise share; its own floor (0.5) is below the run's z
MODES = {
    "secagg": ("", {}),
    "secagg+dp-client": (
        ' privacy.mode="client" privacy.noise-multiplier=1.0 privacy.clip=0.5',
        {"dp-min-noise-multiplier": 0.5},
    ),
}


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.skipif(not flower.flower_installed(), reason="Flower CLI executables not installed")
@pytest.mark.parametrize("mode", list(MODES))
def test_secagg_round_over_tls_deployment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    # Four exchanges per round (advertise, share, masked train, unmask), each starting a
    # fresh `flwr-clientapp` process at every site: give `flwr run` more time than one round.
    monkeypatch.setattr(test_deployment, "RUN_TIMEOUT_S", 420.0)
    # With nginx installed the sites reach the Fleet API through the proxy: every masked
    # vector (larger than nginx's default 16 KB body buffer) crosses it.
    extra_config, node_extra = MODES[mode]
    sites = write_site_files(tmp_path / "sites", DATASET, 2)
    out = deploy_and_run(
        REPO,
        tmp_path,
        [{"data-path": str(p), **node_extra} for p in sites],
        run_config=[RUN_CONFIG[0] + ' secure.mode="secagg"' + extra_config],
        intruder=False,  # the refused SuperNode is test_deployment's; not asserted here
    )
    result = out["result"]
    assert isinstance(result, processes.CliResult)
    assert result.returncode == 0, _logs(tmp_path)
    assert out["status"] == "finished:completed", _logs(tmp_path)
    # Both sites' masked inputs were unmasked into the round's sum; nothing aborted.
    assert "'num_accepted': 2" in result.output, _logs(tmp_path)
    assert "'secagg_aborted': 0" in result.output, _logs(tmp_path)
    if mode == "secagg+dp-client":  # 2 of 2 clients sampled, one round: q = 1, T = 1
        assert f"'dp_epsilon': {epsilon(1.0, 1.0, 1, 1e-5)!r}" in result.output, _logs(tmp_path)
    if out["proxied"]:
        access = (tmp_path / "proxy" / "access.log").read_text()
        pushes = [line for line in access.splitlines() if "POST /v1/fleet/push-messages" in line]
        assert pushes and all('" 200 ' in line for line in pushes), _logs(tmp_path)
    assert processes.tagged_pids(str(out["tag"])) == []  # every process it started is gone
