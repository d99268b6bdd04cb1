"""Deployment helpers: TLS certificates, SuperNode auth keys, Flower CLI connections, processes.

Flower 1.42 serves the SuperLink's Fleet, Control and Runtime APIs over one HTTPS port.
The SuperLink needs a CA certificate, a server certificate and its private key
(``--ssl-ca-certfile/--ssl-certfile/--ssl-keyfile``); SuperNodes and the ``flwr`` CLI
trust the CA (``--root-certificates`` / ``root-certificates`` in ``config.toml``).
SuperNode authentication (``--enable-supernode-auth``) uses one NIST elliptic-curve key
pair per site in OpenSSH format: the public key is registered with
``flwr supernode register``, the private key never leaves the site.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Annotated

import typer
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_HOSTS: tuple[str, ...] = ("127.0.0.1", "localhost")
# Flower requires a NIST curve for SuperNode keys; P-384 is what its docs generate.
NODE_KEY_CURVE = ec.SECP384R1

# Environment that keeps Flower offline and quiet: no telemetry, no PyPI update check,
# no `uv sync` of app dependencies at run time (sites run the venv they installed).
FLWR_OFFLINE_ENV: dict[str, str] = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
}

_PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


class DeployError(RuntimeError):
    """A deployment step failed (bad argument, process died, endpoint never came up)."""


# --------------------------------------------------------------------------- TLS


@dataclass(frozen=True)
class TLSFiles:
    """Paths of a generated CA and server certificate (all PEM)."""

    ca_cert: Path  # give to SuperNodes (--root-certificates) and the flwr CLI
    ca_key: Path  # keep offline: it signs new server certificates
    server_cert: Path  # --ssl-certfile
    server_key: Path  # --ssl-keyfile


def _new_key(key_type: str) -> _PrivateKey:
    if key_type == "ec":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=3072)
    raise DeployError(f"key_type must be 'ec' or 'rsa', got {key_type!r}")


def _write_private_pem(path: Path, key: _PrivateKey) -> None:
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _write_secret(path, pem)


def _write_secret(path: Path, data: bytes) -> None:
    # Private keys are created 0600 from the start, never world-readable even briefly.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.chmod(path, 0o600)


def _san_entries(hosts: Sequence[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def generate_tls(
    out_dir: Path | str,
    hosts: Sequence[str] = DEFAULT_HOSTS,
    *,
    days: int = 365,
    key_type: str = "ec",
    common_name: str = "leanfed SuperLink",
) -> TLSFiles:
    """Write ``ca.crt``, ``ca.key``, ``server.pem``, ``server.key`` into ``out_dir``.

    ``hosts`` are the names and IP addresses SuperNodes and the CLI use to reach the
    SuperLink; each becomes a subjectAltName (IPs as IP entries, names as DNS entries),
    since TLS clients verify the SAN, not the common name.
    """
    if not hosts:
        raise DeployError("hosts must name at least one address of the SuperLink")
    if days < 1:
        raise DeployError(f"days must be >= 1, got {days}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    # Backdate by a minute so clocks a little behind still accept the certificate.
    not_before, not_after = now - dt.timedelta(minutes=1), now + dt.timedelta(days=days)

    ca_key = _new_key(key_type)
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{common_name} CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )

    server_key = _new_key(key_type)
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(_san_entries(hosts)), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )

    files = TLSFiles(
        ca_cert=out / "ca.crt",
        ca_key=out / "ca.key",
        server_cert=out / "server.pem",
        server_key=out / "server.key",
    )
    files.ca_cert.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    files.server_cert.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    for cert in (files.ca_cert, files.server_cert):
        os.chmod(cert, 0o644)  # public by design, whatever the umask
    _write_private_pem(files.ca_key, ca_key)
    _write_private_pem(files.server_key, server_key)
    return files


# ------------------------------------------------------------------ SuperNode keys


@dataclass(frozen=True)
class NodeKeys:
    """One SuperNode's authentication key pair (OpenSSH format, NIST P-384)."""

    private_key: Path  # stays on the site: flower-supernode --auth-supernode-private-key
    public_key: Path  # goes to the operator: flwr supernode register PUBLIC_KEY


def generate_node_keys(out_dir: Path | str, nodes: int, *, prefix: str = "node") -> list[NodeKeys]:
    """Write ``{prefix}-{i}`` (private) and ``{prefix}-{i}.pub`` for i in 0..nodes-1."""
    if nodes < 1:
        raise DeployError(f"nodes must be >= 1, got {nodes}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pairs: list[NodeKeys] = []
    for i in range(nodes):
        key = ec.generate_private_key(NODE_KEY_CURVE())
        priv = out / f"{prefix}-{i}"
        pub = out / f"{prefix}-{i}.pub"
        _write_secret(
            priv,
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.OpenSSH,
                serialization.NoEncryption(),
            ),
        )
        pub.write_bytes(
            key.public_key().public_bytes(
                serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
            )
            + f" {prefix}-{i}\n".encode()
        )
        pairs.append(NodeKeys(private_key=priv, public_key=pub))
    return pairs


# ------------------------------------------------------------- Flower CLI config


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"')
        return f'"{escaped}"'
    raise DeployError(f"unsupported TOML value {value!r} ({type(value).__name__})")


def write_connection(
    flwr_home: Path | str,
    name: str,
    address: str,
    *,
    root_certificates: Path | str | None = None,
    insecure: bool = False,
    make_default: bool = True,
    extra: Mapping[str, object] | None = None,
) -> Path:
    """Write ``$FLWR_HOME/config.toml`` with one SuperLink connection called ``name``.

    ``address`` is ``host:port`` of the SuperLink, or ``":local:"`` for Flower's managed
    local simulation SuperLink. A TLS connection names the CA file (``root_certificates``);
    ``insecure=True`` is for plain-HTTP test SuperLinks only. ``extra`` adds keys such as
    ``{"options.num-supernodes": 2}``. An existing file is replaced.
    """
    if not name or not all(c.isalnum() or c in "-_" for c in name):
        raise DeployError(f"connection name must be letters, digits, '-' or '_', got {name!r}")
    if insecure and root_certificates is not None:
        raise DeployError("a connection is either insecure or has root_certificates, not both")
    home = Path(flwr_home)
    home.mkdir(parents=True, exist_ok=True)
    lines = ["[superlink]"]
    if make_default:
        lines.append(f"default = {_toml_value(name)}")
    lines += ["", f"[superlink.{name}]", f"address = {_toml_value(address)}"]
    if insecure:
        lines.append("insecure = true")
    if root_certificates is not None:
        lines.append(f"root-certificates = {_toml_value(str(Path(root_certificates).resolve()))}")
    for key, value in (extra or {}).items():
        lines.append(f"{key} = {_toml_value(value)}")
    path = home / "config.toml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# -------------------------------------------------------------------- processes


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port the OS reports free on ``host`` right now (bind to port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def flwr_env(flwr_home: Path | str, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for Flower processes: ``base`` (default os.environ) + offline flags."""
    env = dict(os.environ if base is None else base)
    env.update(FLWR_OFFLINE_ENV)
    env["FLWR_HOME"] = str(flwr_home)
    # SuperLink/SuperNode start `flower-superexec`, `flwr-serverapp`, ... by name: put this
    # interpreter's scripts first on PATH so they come from the same environment.
    bin_dir = Path(sys.executable).parent
    if (bin_dir / "flower-superlink").exists():
        env["PATH"] = os.pathsep.join([str(bin_dir), env.get("PATH", "")])
    return env


def start_process(
    cmd: Sequence[str],
    log_path: Path | str,
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | str | None = None,
) -> subprocess.Popen[bytes]:
    """Start ``cmd`` in its own session (process group id == its pid), output to a log file.

    Its own group lets ``stop_process`` signal it and the children that stay in its
    group without touching anything else on the machine.
    """
    log_file: IO[bytes] = open(log_path, "ab")  # noqa: SIM115 - the child owns it
    try:
        return subprocess.Popen(
            list(cmd),
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=None if env is None else dict(env),
            cwd=None if cwd is None else str(cwd),
            start_new_session=True,
        )
    finally:
        log_file.close()  # the child holds its own descriptor


def _parent_map() -> dict[int, int]:
    """pid -> ppid of every visible process (Linux /proc, else `ps`)."""
    parents: dict[int, int] = {}
    proc = Path("/proc")
    if proc.is_dir():
        for entry in proc.iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            # The command name (field 2) may contain spaces; ppid is the 2nd field after ')'.
            fields = stat.rsplit(")", 1)[-1].split()
            parents[int(entry.name)] = int(fields[1])
        return parents
    out = subprocess.run(
        ["ps", "-A", "-o", "pid=,ppid="], capture_output=True, text=True, check=False
    ).stdout
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0].isdigit() and parts[1].isdigit():
            parents[int(parts[0])] = int(parts[1])
    return parents


def descendants(pid: int) -> list[int]:
    """Pids of all live descendants of ``pid`` (children first found, breadth-first)."""
    parents = _parent_map()
    children: dict[int, list[int]] = {}
    for child, parent in parents.items():
        children.setdefault(parent, []).append(child)
    found: list[int] = []
    frontier = [pid]
    while frontier:
        nxt: list[int] = []
        for p in frontier:
            for c in children.get(p, []):
                if c not in found:
                    found.append(c)
                    nxt.append(c)
        frontier = nxt
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie still answers signal 0; treat it as gone (its parent reaps it).
    stat = Path(f"/proc/{pid}/stat")
    if stat.exists():
        try:
            return stat.read_text().rsplit(")", 1)[-1].split()[0] != "Z"
        except OSError:
            return False
    return True


def _signal_pid(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> int | None:
    """Stop a process started by ``start_process`` and everything it spawned, by pid.

    Flower's SuperLink and SuperNode start ``flower-superexec`` in a new session (so it
    is outside their process group); we therefore record all descendant pids first,
    send SIGTERM to the process group and to each recorded pid, wait up to ``timeout``
    seconds, then SIGKILL whatever is left. Returns the exit code (None if unknown).
    """
    kids = descendants(proc.pid)
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            _signal_pid(proc.pid, signal.SIGTERM)
    for pid in kids:
        _signal_pid(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None and not any(_alive(p) for p in kids):
            break
        time.sleep(0.1)
    # Anything the SIGTERM round spawned or left behind.
    kids += [p for p in descendants(proc.pid) if p not in kids]
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            _signal_pid(proc.pid, signal.SIGKILL)
    for pid in kids:
        if _alive(pid):
            _signal_pid(pid, signal.SIGKILL)
    try:
        return proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        return None


def wait_for_health(
    address: str,
    *,
    ca_cert: Path | str | None = None,
    timeout: float = 30.0,
    proc: subprocess.Popen[bytes] | None = None,
) -> None:
    """Poll ``http(s)://address/health`` until it answers 200 (HTTPS when ``ca_cert``).

    Raises DeployError if ``proc`` exits first or ``timeout`` seconds pass.
    """
    scheme = "https" if ca_cert is not None else "http"
    url = f"{scheme}://{address}/health"
    context = ssl.create_default_context(cafile=str(ca_cert)) if ca_cert is not None else None
    deadline = time.monotonic() + timeout
    last: str = "no answer"
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise DeployError(f"process {proc.pid} exited with {proc.returncode} before {url}")
        try:
            with urllib.request.urlopen(url, timeout=2, context=context) as resp:
                if resp.status == 200:
                    return
                last = f"HTTP {resp.status}"
        except (urllib.error.URLError, OSError) as err:
            last = str(err)
        time.sleep(0.2)
    raise DeployError(f"{url} not healthy after {timeout:.0f}s ({last})")


# ------------------------------------------------------------ Flower commands


def node_config_arg(config: Mapping[str, object]) -> str:
    """Format ``--node-config``: ``key=value`` pairs, strings TOML-quoted, space-separated."""
    if not config:
        raise DeployError("node config is empty")
    return " ".join(f"{key}={_node_config_value(key, value)}" for key, value in config.items())


def _node_config_value(key: str, value: object) -> str:
    # Flower splits the argument with the regex  (\S+?)=('[^']*'|"[^"]*"|\S+)  and then
    # parses TOML, so a string may not contain its own quote character and escapes are
    # not understood inside '...'. Prefer "..." and fall back to a TOML literal '...'.
    if not key or any(c.isspace() or c in "='\"" for c in key):
        raise DeployError(f"node config key {key!r} may not be empty or hold spaces, = or quotes")
    if not isinstance(value, str):
        return _toml_value(value)
    if "\n" in value or "\r" in value:
        raise DeployError(f"node config {key!r}: value may not contain a newline")
    if '"' not in value and "\\" not in value:
        return f'"{value}"'
    if "'" not in value:
        return f"'{value}'"
    raise DeployError(f"node config {key!r}: value may not contain both ' and \"")


def superlink_command(
    port: int,
    tls: TLSFiles | None,
    *,
    host: str = "127.0.0.1",
    simulation: bool = False,
    supernode_auth: bool = False,
    database: Path | str | None = None,
) -> list[str]:
    """``flower-superlink`` argv: one HTTP(S) port for the Fleet, Control and Runtime APIs.

    ``tls=None`` means ``--insecure`` (plain HTTP; tests and simulation only). SuperNode
    authentication needs TLS. Without ``database`` the link state lives in memory.
    """
    if supernode_auth and tls is None:
        raise DeployError("--enable-supernode-auth requires TLS certificates")
    cmd = ["flower-superlink", "--host", host, "--port", str(port)]
    if tls is None:
        cmd.append("--insecure")
    else:
        cmd += [
            "--ssl-ca-certfile",
            str(tls.ca_cert),
            "--ssl-certfile",
            str(tls.server_cert),
            "--ssl-keyfile",
            str(tls.server_key),
        ]
    if supernode_auth:
        cmd.append("--enable-supernode-auth")
    if simulation:
        cmd.append("--simulation")
    if database is not None:
        cmd += ["--database", str(database)]
    # App dependencies come from the site's own environment, never `uv sync` at run time.
    cmd.append("--disable-runtime-dependency-installation")
    return cmd


def supernode_command(
    superlink: str,
    port: int,
    node_config: Mapping[str, object],
    *,
    ca_cert: Path | str | None,
    private_key: Path | str | None = None,
    host: str = "127.0.0.1",
    max_retries: int | None = None,
    max_wait_time: float | None = None,
) -> list[str]:
    """``flower-supernode`` argv.

    ``superlink`` is the SuperLink's ``host:port``; ``port`` is this SuperNode's own local
    Runtime API port (its ClientApp processes connect there, so two SuperNodes on one
    machine need two ports). ``ca_cert=None`` means ``--insecure``.
    """
    cmd = ["flower-supernode", "--superlink", superlink, "--host", host, "--port", str(port)]
    cmd += ["--insecure"] if ca_cert is None else ["--root-certificates", str(ca_cert)]
    if private_key is not None:
        cmd += ["--auth-supernode-private-key", str(private_key)]
    if max_retries is not None:
        cmd += ["--max-retries", str(max_retries)]
    if max_wait_time is not None:
        cmd += ["--max-wait-time", str(max_wait_time)]
    cmd += ["--node-config", node_config_arg(node_config)]
    return cmd


_APP_COPY_IGNORE = (
    ".venv",
    ".git",
    "__pycache__",
    ".pytest_cache",
    ".mypy_cache",
    ".ruff_cache",
    ".hypothesis",
    "*.pyc",
    "*.db",
)


def copy_app(src: Path | str, dst: Path | str) -> Path:
    """Copy a Flower App folder without virtualenvs, VCS data, caches and databases.

    ``flwr run`` walks the whole app folder to build the FAB; a copy keeps it from
    walking a large ``.venv`` and from seeing files another process is writing.
    """
    src_path, dst_path = Path(src), Path(dst)
    if not (src_path / "pyproject.toml").is_file():
        raise DeployError(f"{src_path} is not a Flower App (no pyproject.toml)")
    shutil.copytree(src_path, dst_path, ignore=shutil.ignore_patterns(*_APP_COPY_IGNORE))
    return dst_path


@dataclass(frozen=True)
class CliResult:
    """What a finished (or timed-out) command printed."""

    returncode: int | None  # None: killed after the timeout
    output: str  # stdout and stderr interleaved
    seconds: float


def run_logged(
    cmd: Sequence[str],
    log_path: Path | str,
    *,
    env: Mapping[str, str] | None = None,
    timeout: float = 300.0,
    cwd: Path | str | None = None,
) -> CliResult:
    """Run ``cmd`` to completion via ``start_process``; stop it (and its children) on timeout."""
    start = time.monotonic()
    proc = start_process(cmd, log_path, env=env, cwd=cwd)
    try:
        code: int | None = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        code = None
    finally:
        if proc.poll() is None:
            stop_process(proc)
    output = Path(log_path).read_text(encoding="utf-8", errors="replace")
    return CliResult(returncode=code, output=output, seconds=time.monotonic() - start)


_RUN_ID = re.compile(r"Successfully started run (\d+)")


def started_run_id(output: str) -> int:
    """The run id ``flwr run`` printed (``Successfully started run <id>``)."""
    match = _RUN_ID.search(output)
    if match is None:
        raise DeployError("flwr run did not report a started run")
    return int(match.group(1))


def run_status(connection: str, run_id: int, *, env: Mapping[str, str]) -> str:
    """Status of a run on a SuperLink (e.g. ``finished:completed``), via ``flwr list``.

    ``flwr run --stream`` exits 0 even when the ServerApp fails, so callers check this.
    """
    res = subprocess.run(
        ["flwr", "list", connection, "--format", "json"],
        env=dict(env),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    try:
        runs = json.loads(res.stdout)["runs"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        detail = f"{res.stdout[-500:]} {res.stderr[-500:]}"
        raise DeployError(f"flwr list gave no run list: {detail}") from err
    for run in runs:
        if int(run["run-id"]) == run_id:
            return str(run["status"])
    raise DeployError(f"run {run_id} not listed by the SuperLink")


# --------------------------------------------------------------------------- CLI


def register(app: typer.Typer) -> None:
    """Add ``leanfed deploy certs`` and ``leanfed deploy keys`` to the ``leanfed`` CLI."""
    deploy_app = typer.Typer(
        pretty_exceptions_show_locals=False,
        no_args_is_help=True, help="Certificates and SuperNode keys for a real deployment."
    )

    @deploy_app.command("certs")
    def certs(
        out: Annotated[Path, typer.Option("--out", help="Folder for ca.crt, server.pem, keys")],
        host: Annotated[
            list[str] | None,
            typer.Option("--host", help="SuperLink name or IP (repeat); default 127.0.0.1"),
        ] = None,
        days: Annotated[int, typer.Option(help="Validity in days")] = 365,
        key_type: Annotated[str, typer.Option("--key-type", help="ec | rsa")] = "ec",
    ) -> None:
        """Generate a CA and a SuperLink server certificate signed by it."""
        try:
            files = generate_tls(
                out, tuple(host) if host else DEFAULT_HOSTS, days=days, key_type=key_type
            )
        except DeployError as err:
            raise typer.BadParameter(str(err)) from err
        typer.echo(f"CA certificate   {files.ca_cert}  (give to SuperNodes and the flwr CLI)")
        typer.echo(f"CA private key   {files.ca_key}  (keep offline)")
        typer.echo(f"server cert/key  {files.server_cert} {files.server_key}  (SuperLink only)")

    @deploy_app.command("keys")
    def keys(
        out: Annotated[Path, typer.Option("--out", help="Folder for the key pairs")],
        nodes: Annotated[int, typer.Option("--nodes", help="How many SuperNodes")] = 1,
        prefix: Annotated[str, typer.Option(help="File name prefix")] = "node",
    ) -> None:
        """Generate SuperNode authentication key pairs (EC P-384, OpenSSH format)."""
        try:
            pairs = generate_node_keys(out, nodes, prefix=prefix)
        except DeployError as err:
            raise typer.BadParameter(str(err)) from err
        for pair in pairs:
            typer.echo(f"{pair.private_key}  (site only)  {pair.public_key}  (register)")

    app.add_typer(deploy_app, name="deploy")
