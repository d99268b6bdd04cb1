"""Fast tests of the deployment helpers: certificates, node keys, connections, processes."""

from __future__ import annotations

import http.server
import os
import signal
import socket
import ssl
import stat
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
import typer
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from typer.testing import CliRunner

from server.security import errors, flower, node_keys, processes
from server.security import tls as tls_files
from simulations import deploy as deploy_cli

# ----------------------------------------------------------------------------- TLS


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> tls_files.TLSFiles:
    return tls_files.generate_tls(tmp_path_factory.mktemp("certs"))


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_tls_files_and_private_key_modes(tls: tls_files.TLSFiles) -> None:
    for path in (tls.ca_cert, tls.ca_key, tls.server_cert, tls.server_key):
        assert path.is_file() and path.stat().st_size > 0
    for key in (tls.ca_key, tls.server_key):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
    for cert in (tls.ca_cert, tls.server_cert):
        assert stat.S_IMODE(cert.stat().st_mode) == 0o644  # certificates are public


def test_ca_signs_server_cert_with_sans(tls: tls_files.TLSFiles) -> None:
    ca, server = _cert(tls.ca_cert), _cert(tls.server_cert)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    assert server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    server.verify_directly_issued_by(ca)  # raises if the signature or issuer is wrong
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    key = serialization.load_pem_private_key(tls.server_key.read_bytes(), password=None)
    assert key.public_key() == server.public_key()


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_tls_handshake_verifies_against_ca(tls: tls_files.TLSFiles, host: str) -> None:
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(tls.server_cert, tls.server_key)
    client_ctx = ssl.create_default_context(cafile=str(tls.ca_cert))  # checks hostname too
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        errors: list[BaseException] = []

        def serve() -> None:
            conn, _ = listener.accept()
            try:
                with server_ctx.wrap_socket(conn, server_side=True) as tls_conn:
                    tls_conn.sendall(b"ok")
            except (ssl.SSLError, OSError) as err:  # surfaced below
                errors.append(err)

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        with (
            socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
            client_ctx.wrap_socket(raw, server_hostname=host) as conn,
        ):
            assert conn.recv(2) == b"ok"
        thread.join(timeout=5)
        assert not errors


def test_wrong_hostname_is_rejected(tls: tls_files.TLSFiles) -> None:
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(tls.server_cert, tls.server_key)
    client_ctx = ssl.create_default_context(cafile=str(tls.ca_cert))
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]

        def serve() -> None:
            conn, _ = listener.accept()
            try:
                server_ctx.wrap_socket(conn, server_side=True).close()
            except (ssl.SSLError, OSError):
                conn.close()

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        with (
            socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
            pytest.raises(ssl.SSLCertVerificationError),
        ):
            client_ctx.wrap_socket(raw, server_hostname="hospital.example.org")
        thread.join(timeout=5)


def test_rsa_and_custom_hosts(tmp_path: Path) -> None:
    hosts = ["link.example.org", "10.0.0.5"]
    files = tls_files.generate_tls(tmp_path, hosts, key_type="rsa", days=2)
    server = _cert(files.server_cert)
    assert isinstance(server.public_key(), rsa.RSAPublicKey)
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["link.example.org"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["10.0.0.5"]
    lifetime = server.not_valid_after_utc - server.not_valid_before_utc
    assert 2 * 86400 <= lifetime.total_seconds() <= 2 * 86400 + 120


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"hosts": []}, "hosts"),
        ({"days": 0}, "days"),
        ({"key_type": "dsa"}, "key_type"),
    ],
)
def test_generate_tls_rejects_bad_arguments(
    tmp_path: Path, kwargs: dict[str, object], message: str
) -> None:
    with pytest.raises(errors.DeployError, match=message):
        tls_files.generate_tls(tmp_path, **kwargs)  # type: ignore[arg-type]


# ----------------------------------------------------------------------- node keys


def test_node_keys_are_openssh_p384_pairs(tmp_path: Path) -> None:
    pairs = node_keys.generate_node_keys(tmp_path, 3)
    assert [p.private_key.name for p in pairs] == ["node-0", "node-1", "node-2"]
    assert [p.public_key.name for p in pairs] == ["node-0.pub", "node-1.pub", "node-2.pub"]
    publics = set()
    for pair in pairs:
        assert stat.S_IMODE(pair.private_key.stat().st_mode) == 0o600
        priv = serialization.load_ssh_private_key(pair.private_key.read_bytes(), password=None)
        pub = serialization.load_ssh_public_key(pair.public_key.read_bytes())
        assert isinstance(priv, ec.EllipticCurvePrivateKey)
        assert isinstance(pub, ec.EllipticCurvePublicKey)
        assert isinstance(pub.curve, ec.SECP384R1)
        assert priv.public_key() == pub
        publics.add(pair.public_key.read_bytes().split()[1])
    assert len(publics) == 3  # every site has its own key


def test_node_keys_accepted_by_flower(tmp_path: Path) -> None:
    from flwr.cli.supernode.register import try_load_public_key

    pair = node_keys.generate_node_keys(tmp_path, 1, prefix="clinic")[0]
    assert pair.private_key.name == "clinic-0"
    assert try_load_public_key(pair.public_key)  # Flower's own NIST-curve check


def test_node_keys_rejects_zero(tmp_path: Path) -> None:
    with pytest.raises(errors.DeployError, match="nodes"):
        node_keys.generate_node_keys(tmp_path, 0)


# ---------------------------------------------------------------- Flower config.toml


def test_write_connection_tls_round_trips_through_flower(
    tmp_path: Path, tls: tls_files.TLSFiles, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flwr.cli.flower_config import read_superlink_connection

    path = flower.write_connection(
        tmp_path, "hospital", "link.example.org:9093", root_certificates=tls.ca_cert
    )
    data = tomllib.loads(path.read_text())
    assert data["superlink"]["default"] == "hospital"
    monkeypatch.setenv("FLWR_HOME", str(tmp_path))
    conn = read_superlink_connection("hospital")
    assert conn.address == "link.example.org:9093"
    assert conn.root_certificates == str(tls.ca_cert.resolve())
    assert not conn.insecure
    assert read_superlink_connection(None).name == "hospital"  # the default


def test_write_connection_insecure_and_options(tmp_path: Path) -> None:
    path = flower.write_connection(
        tmp_path,
        "sim",
        ":local:",
        insecure=True,
        make_default=False,
        extra={"options.num-supernodes": 2},
    )
    data = tomllib.loads(path.read_text())
    assert "default" not in data["superlink"]
    assert data["superlink"]["sim"] == {
        "address": ":local:",
        "insecure": True,
        "options": {"num-supernodes": 2},
    }


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [("bad name", {}), ("ok", {"insecure": True, "root_certificates": "ca.crt"})],
)
def test_write_connection_rejects(tmp_path: Path, name: str, kwargs: dict[str, object]) -> None:
    with pytest.raises(errors.DeployError):
        flower.write_connection(tmp_path, name, "127.0.0.1:1", **kwargs)  # type: ignore[arg-type]


# --------------------------------------------------------------- command builders


def test_node_config_arg_parses_back_in_flower() -> None:
    from flwr.common.config import parse_config_args

    cfg = {
        "data-path": "/my site/data.npz",
        "quoted": '/site/my "data".npz',
        "windows": "C:\\sites\\x.npz",
        "partition-id": 1,
        "frac": 0.5,
        "flag": True,
    }
    arg = flower.node_config_arg(cfg)
    assert arg.startswith('data-path="/my site/data.npz" ')
    assert parse_config_args([arg]) == cfg
    for bad in ({}, {"x": 'it\'s "both"'}, {"x": "two\nlines"}, {"a b": 1}, {"a=b": 1}):
        with pytest.raises(errors.DeployError):
            flower.node_config_arg(bad)


def test_superlink_and_supernode_commands(tls: tls_files.TLSFiles) -> None:
    cmd = flower.superlink_command(9093, tls, supernode_auth=True, host="0.0.0.0")
    assert cmd[:5] == ["flower-superlink", "--host", "0.0.0.0", "--port", "9093"]
    assert cmd[cmd.index("--ssl-certfile") + 1] == str(tls.server_cert)
    assert "--enable-supernode-auth" in cmd and "--insecure" not in cmd
    assert "--disable-runtime-dependency-installation" in cmd
    sim = flower.superlink_command(1234, None, simulation=True, database="state.db")
    assert "--insecure" in sim and "--simulation" in sim and "state.db" in sim
    with pytest.raises(errors.DeployError, match="TLS"):
        flower.superlink_command(1, None, supernode_auth=True)

    node = flower.supernode_command(
        "link:9093", 9094, {"data-path": "/d.npz"}, ca_cert=tls.ca_cert, private_key="k"
    )
    assert node[node.index("--root-certificates") + 1] == str(tls.ca_cert)
    assert node[node.index("--auth-supernode-private-key") + 1] == "k"
    assert node[-2:] == ["--node-config", 'data-path="/d.npz"']
    insecure = flower.supernode_command("l:1", 2, {"a": 1}, ca_cert=None, max_retries=0)
    assert "--insecure" in insecure and insecure[insecure.index("--max-retries") + 1] == "0"


def test_started_run_id() -> None:
    assert flower.started_run_id("x\nSuccessfully started run 123456789\n") == 123456789
    with pytest.raises(errors.DeployError):
        flower.started_run_id("Failed to start run")


def test_copy_app_skips_venv_and_caches(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "pkg" / "__pycache__").mkdir(parents=True)
    (src / ".venv" / "lib").mkdir(parents=True)
    (src / "pyproject.toml").write_text("[project]\n")
    (src / "pkg" / "a.py").write_text("x = 1\n")
    (src / "pkg" / "__pycache__" / "a.cpython-311.pyc").write_bytes(b"\0")
    (src / ".venv" / "lib" / "big.py").write_text("")
    (src / "run.db").write_bytes(b"\0")
    dst = flower.copy_app(src, tmp_path / "dst")
    copied = sorted(p.relative_to(dst).as_posix() for p in dst.rglob("*") if p.is_file())
    assert copied == ["pkg/a.py", "pyproject.toml"]
    with pytest.raises(errors.DeployError, match="pyproject"):
        flower.copy_app(tmp_path / "dst" / "pkg", tmp_path / "again")


def test_flwr_env_is_offline(tmp_path: Path) -> None:
    env = flower.flwr_env(tmp_path, base={"PATH": "/usr/bin"})
    assert env["FLWR_HOME"] == str(tmp_path)
    assert env["FLWR_TELEMETRY_ENABLED"] == "0"
    assert env["FLWR_DISABLE_UPDATE_CHECK"] == "1"
    assert env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] == "1"
    assert env["PATH"].endswith("/usr/bin")


# ---------------------------------------------------------------------- processes


def test_free_port_is_bindable() -> None:
    port = processes.free_port()
    with socket.create_server(("127.0.0.1", port)):
        pass


# A parent that starts a child in a NEW session (as flower-superlink starts
# flower-superexec), prints the child's pid, then sleeps.
_SPAWNER = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                         start_new_session=True)
print(child.pid, flush=True)
time.sleep(60)
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat_file = Path(f"/proc/{pid}/stat")
    return not (stat_file.exists() and stat_file.read_text().rsplit(")", 1)[-1].split()[0] == "Z")


def test_stop_process_stops_detached_children(tmp_path: Path) -> None:
    log = tmp_path / "spawner.log"
    proc = processes.start_process([sys.executable, "-c", _SPAWNER], log)
    try:
        deadline = time.monotonic() + 10
        while not log.read_text().strip() and time.monotonic() < deadline:
            time.sleep(0.05)
        child = int(log.read_text().split()[0])
        assert os.getpgid(proc.pid) == proc.pid  # its own process group
        assert os.getpgid(child) != proc.pid  # the child escaped that group
        assert processes.descendants(proc.pid) == [child]
    finally:
        code = processes.stop_process(proc, timeout=5)
    assert code == -signal.SIGTERM
    deadline = time.monotonic() + 5
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child)


def test_run_logged_output_and_timeout(tmp_path: Path) -> None:
    ok = processes.run_logged([sys.executable, "-c", "print('hello')"], tmp_path / "ok.log")
    assert ok.returncode == 0 and ok.output.strip() == "hello"
    slow = processes.run_logged(
        [sys.executable, "-c", "import time; time.sleep(30)"], tmp_path / "slow.log", timeout=0.5
    )
    assert slow.returncode is None  # killed at the timeout, not run to completion


class _Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def health_server() -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def test_wait_for_health(health_server: int) -> None:
    processes.wait_for_health(f"127.0.0.1:{health_server}", timeout=5)


def test_wait_for_health_times_out_or_sees_exit(tmp_path: Path) -> None:
    port = processes.free_port()
    with pytest.raises(errors.DeployError, match="not healthy"):
        processes.wait_for_health(f"127.0.0.1:{port}", timeout=0.5)
    dead = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    dead.wait()
    with pytest.raises(errors.DeployError, match="exited with 3"):
        processes.wait_for_health(f"127.0.0.1:{port}", timeout=5, proc=dead)


# ---------------------------------------------------------------------------- CLI


def test_cli_certs_and_keys(tmp_path: Path) -> None:
    app = typer.Typer()
    deploy_cli.register(app)
    runner = CliRunner()
    res = runner.invoke(app, ["deploy", "certs", "--out", str(tmp_path / "c"), "--host", "x.org"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "c" / "ca.crt").is_file() and (tmp_path / "c" / "server.key").is_file()
    res = runner.invoke(app, ["deploy", "keys", "--out", str(tmp_path / "k"), "--nodes", "2"])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in (tmp_path / "k").iterdir()) == [
        "node-0",
        "node-0.pub",
        "node-1",
        "node-1.pub",
    ]
    res = runner.invoke(app, ["deploy", "keys", "--out", str(tmp_path / "k2"), "--nodes", "0"])
    assert res.exit_code != 0
