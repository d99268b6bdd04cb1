"""Flower command lines and CLI connections: SuperLink, SuperNode, `flwr` config.toml.

SuperNodes with ``--trusted-entities`` run only FABs signed by a listed Ed25519 key
(see ``server.security.apps``); ``--enable-supernode-auth`` admits only registered
SuperNode keys (``server.security.node_keys``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

from server.security.errors import DeployError
from server.security.tls import TLSFiles

# Environment that keeps Flower offline and quiet: no telemetry, no PyPI update check,
# no `uv sync` of app dependencies at run time (sites run the venv they installed).
FLWR_OFFLINE_ENV: dict[str, str] = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
}


def toml_value(value: object) -> str:
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
        lines.append(f"default = {toml_value(name)}")
    lines += ["", f"[superlink.{name}]", f"address = {toml_value(address)}"]
    if insecure:
        lines.append("insecure = true")
    if root_certificates is not None:
        lines.append(f"root-certificates = {toml_value(str(Path(root_certificates).resolve()))}")
    for key, value in (extra or {}).items():
        lines.append(f"{key} = {toml_value(value)}")
    path = home / "config.toml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path



SERVER_EXECUTABLES = ("flwr", "flower-superlink", "flower-supernode", "flower-superexec")


def flower_installed(executables: tuple[str, ...] = SERVER_EXECUTABLES) -> bool:
    """Whether Flower's command-line programs are installed (beside this interpreter or on PATH)."""
    bin_dir = Path(sys.executable).parent
    return all((bin_dir / exe).exists() or shutil.which(exe) is not None for exe in executables)


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
        return toml_value(value)
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
    trusted_entities: Path | str | None = None,
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
    if trusted_entities is not None:
        # Only FABs signed by a key in this YAML run here (server.security.apps).
        cmd += ["--trusted-entities", str(trusted_entities)]
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

