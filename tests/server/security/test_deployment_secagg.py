"""SecAgg+ over the real TLS + SuperNode-auth deployment (through nginx when installed)."""

from __future__ import annotations

from pathlib import Path

import pytest
import test_deployment  # the same directory: pytest puts it on sys.path
from test_deployment import DATASET, REPO, RUN_CONFIG, _logs, deploy_and_run, write_site_files

from server.security import flower, processes


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.skipif(not flower.flower_installed(), reason="Flower CLI executables not installed")
def test_secagg_round_over_tls_deployment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Four exchanges per round (advertise, share, masked train, unmask), each starting a
    # fresh `flwr-clientapp` process at every site: give `flwr run` more time than one round.
    monkeypatch.setattr(test_deployment, "RUN_TIMEOUT_S", 420.0)
    # With nginx installed the sites reach the Fleet API through the proxy: every masked
    # vector (larger than nginx's default 16 KB body buffer) crosses it.
    sites = write_site_files(tmp_path / "sites", DATASET, 2)
    out = deploy_and_run(
        REPO,
        tmp_path,
        [{"data-path": str(p)} for p in sites],
        run_config=[RUN_CONFIG[0] + ' secure.mode="secagg"'],
    )
    result = out["result"]
    assert isinstance(result, processes.CliResult)
    assert result.returncode == 0, _logs(tmp_path)
    assert out["status"] == "finished:completed", _logs(tmp_path)
    # Both sites' masked inputs were unmasked into the round's sum; nothing aborted.
    assert "'num_accepted': 2" in result.output, _logs(tmp_path)
    assert "'secagg_aborted': 0" in result.output, _logs(tmp_path)
    if out["proxied"]:
        access = (tmp_path / "proxy" / "access.log").read_text()
        pushes = [line for line in access.splitlines() if "POST /v1/fleet/push-messages" in line]
        assert pushes and all('" 200 ' in line for line in pushes), _logs(tmp_path)
    assert processes.tagged_pids(str(out["tag"])) == []  # every process it started is gone
