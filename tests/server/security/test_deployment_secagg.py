"""SecAgg+ over the real TLS + SuperNode-auth deployment: two sites, one securely summed round."""

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
    # Sites talk to the SuperLink directly: through the nginx proxy, request bodies above
    # nginx's in-memory buffer (a masked vector is one) fail with 500 (see the report).
    monkeypatch.setattr(test_deployment, "nginx_binary", lambda: None)
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
