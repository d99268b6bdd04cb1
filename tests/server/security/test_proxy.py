"""The Control API is not reachable by sites: nginx (Debian's) in front of a real SuperLink.

The attack of issue 10: anyone who can reach the SuperLink port (and holds the public CA
certificate) could list runs and register a SuperNode key of their own. Here the SuperLink
listens on loopback for the operator, nginx (own prefix, free ports) exposes only the Fleet
API to sites; through nginx `flwr ls` and `flwr supernode register` fail, while a
registered SuperNode connects through it and comes online.
"""

from __future__ import annotations

import json
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from server.security import flower, node_keys, processes
from server.security.errors import DeployError
from server.security.proxy import nginx_binary, nginx_conf, write_proxy
from server.security.tls import generate_tls

NGINX = nginx_binary()
needs_nginx = pytest.mark.skipif(
    NGINX is None, reason="nginx not installed (apt-get install -y nginx); .ci/run installs it"
)


def test_conf_forwards_only_fleet_and_health(tmp_path: Path) -> None:
    tls = generate_tls(tmp_path / "certs")
    conf = nginx_conf("0.0.0.0:9093", "127.0.0.1:9091", tls, prefix=tmp_path)
    locations = [line.strip() for line in conf.splitlines() if line.strip().startswith("location")]
    assert locations == [
        "location /v1/fleet/ {",
        "location = /health {",
        "location / { return 403; }",
    ]
    assert "proxy_ssl_verify on;" in conf and "listen 0.0.0.0:9093 ssl;" in conf
    for bad in ("1.2.3.4:1; include /etc/passwd", "a b", ""):
        with pytest.raises(DeployError):
            nginx_conf(bad, "127.0.0.1:9091", tls)


@needs_nginx
def test_nginx_accepts_the_conf(tmp_path: Path) -> None:
    tls = generate_tls(tmp_path / "certs")
    files = write_proxy(tmp_path / "proxy", "127.0.0.1:9", "127.0.0.1:9", tls)
    assert NGINX is not None
    res = subprocess.run(
        [*files.command(NGINX), "-t"], capture_output=True, text=True, timeout=30, check=False
    )
    assert res.returncode == 0, res.stdout + res.stderr


def _post(url: str, ca: Path) -> int:
    ctx = ssl.create_default_context(cafile=str(ca))
    req = urllib.request.Request(url, data=b"", headers={"Content-Type": "application/protobuf"})
    try:
        with urllib.request.urlopen(req, timeout=10, context=ctx) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as err:
        return int(err.code)


def _flwr(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["flwr", *args], env=env, capture_output=True, text=True, timeout=60, check=False
    )


def _nodes(env: dict[str, str]) -> list[dict[str, str]]:
    res = _flwr(["supernode", "list", "operator", "--format", "json"], env)
    return list(json.loads(res.stdout)["nodes"]) if res.returncode == 0 else []


@needs_nginx
@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.skipif(not flower.flower_installed(), reason="Flower CLI not installed")
def test_sites_reach_fleet_only(tmp_path: Path) -> None:
    assert NGINX is not None
    tls = generate_tls(tmp_path / "certs")
    site_key, intruder_key = node_keys.generate_node_keys(tmp_path / "keys", 2)
    home = tmp_path / "flwr-home"
    env = flower.flwr_env(home)
    link_port, proxy_port = processes.free_port(), processes.free_port()
    direct, proxied = f"127.0.0.1:{link_port}", f"127.0.0.1:{proxy_port}"
    # Two CLI connections: the operator's (direct, loopback) and a site's (through nginx).
    flower.write_connection(home, "operator", direct, root_certificates=tls.ca_cert)
    text = (home / "config.toml").read_text()
    (home / "config.toml").write_text(
        text + f'\n[superlink.site]\naddress = "{proxied}"\n'
        f'root-certificates = "{tls.ca_cert.resolve()}"\n'
    )
    proxy = write_proxy(tmp_path / "proxy", proxied, direct, tls)
    procs = []
    try:
        link = processes.start_process(
            flower.superlink_command(link_port, tls, supernode_auth=True),
            tmp_path / "superlink.log", env=env, cwd=tmp_path,
        )
        procs.append(link)
        processes.wait_for_health(direct, ca_cert=tls.ca_cert, proc=link, timeout=60)
        nginx = processes.start_process(proxy.command(NGINX), tmp_path / "nginx.log")
        procs.append(nginx)
        processes.wait_for_health(proxied, ca_cert=tls.ca_cert, proc=nginx, timeout=30)

        # A site-side client, through the proxy: no Control API at all.
        assert _post(f"https://{proxied}/v1/control/list-runs", tls.ca_cert) == 403
        assert _post(f"https://{proxied}/v1/control/register-node", tls.ca_cert) == 403
        assert _post(f"https://{proxied}/v1/control/start-run", tls.ca_cert) == 403
        assert _post(f"https://{proxied}/v1/runtime/pull-messages", tls.ca_cert) == 403
        assert _post(f"https://{proxied}/docs", tls.ca_cert) == 403
        ls = _flwr(["ls", "site"], env)
        assert ls.returncode != 0, ls.stdout + ls.stderr
        reg = _flwr(["supernode", "register", str(intruder_key.public_key), "site"], env)
        assert reg.returncode != 0 and "registered successfully" not in reg.stdout, reg.stdout
        assert _nodes(env) == []  # nothing was registered through the proxy

        # The operator registers the site's key directly; the site connects through nginx.
        reg = _flwr(["supernode", "register", str(site_key.public_key), "operator"], env)
        assert reg.returncode == 0 and "registered successfully" in reg.stdout, reg.stdout
        site = processes.start_process(
            flower.supernode_command(
                proxied, processes.free_port(), {"data-path": "/nowhere.npz"},
                ca_cert=tls.ca_cert, private_key=site_key.private_key,
            ),
            tmp_path / "site.log", env=env, cwd=tmp_path,
        )
        procs.append(site)
        deadline, status = time.monotonic() + 60, []
        while time.monotonic() < deadline:
            status = [n["status"] for n in _nodes(env)]
            if status == ["online"]:
                break
            time.sleep(1)
    finally:
        for proc in reversed(procs):
            processes.stop_process(proc)
    access = (proxy.prefix / "access.log").read_text()
    assert status == ["online"], f"{status}\n{access[-2000:]}"
    assert "POST /v1/fleet/activate-node" in access  # the site really came through nginx


def test_cli_proxy(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from simulations.cli import app

    runner = CliRunner()
    res = runner.invoke(app, ["deploy", "proxy", "--out", str(tmp_path / "p"),
                              "--certs", str(tmp_path / "none")])
    assert res.exit_code == 1 and "lacks ca.crt" in res.output, res.output
    generate_tls(tmp_path / "certs")
    res = runner.invoke(app, ["deploy", "proxy", "--out", str(tmp_path / "p"),
                              "--certs", str(tmp_path / "certs"), "--listen", "10.0.0.5:443"])
    assert res.exit_code == 0, res.output
    assert "listen 10.0.0.5:443 ssl;" in (tmp_path / "p" / "nginx.conf").read_text()
