"""Start, watch and stop deployment processes (SuperLink, SuperNodes, nginx) by their pid.

Lives beside the security configuration it launches: every process gets its own session
so that stopping it signals only what it started, never anything found by name.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from server.security.errors import DeployError


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port the OS reports free on ``host`` right now (bind to port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])



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


TAG_ENV = "LEANFED_PROCESS_TAG"  # inherited by every child: finds them after reparenting


def tagged_env(env: Mapping[str, str] | None, tag: str) -> dict[str, str]:
    """``env`` (default: this process's) plus the tag that `stop_tagged` looks for."""
    return {**(os.environ if env is None else env), TAG_ENV: tag}


def tagged_pids(tag: str) -> list[int]:
    """Live pids whose environment holds ``TAG_ENV=tag`` (Linux /proc; [] elsewhere).

    A process started with a tagged env passes the tag to everything it spawns, also to
    children that left its session or were reparented when their parent died, which
    `descendants` can no longer find.
    """
    needle = f"{TAG_ENV}={tag}".encode()
    found: list[int] = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        pid = int(entry.name)
        if pid != os.getpid() and needle in environ.split(b"\0") and _alive(pid):
            found.append(pid)
    return found


def stop_tagged(tag: str, timeout: float = 10.0) -> list[int]:
    """SIGTERM, then after ``timeout`` SIGKILL, every live process carrying ``tag``.

    Returns the pids that were still running (the leftovers of a failed teardown).
    """
    pids = tagged_pids(tag)
    for pid in pids:
        _signal_pid(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.1)
    for pid in pids:
        if _alive(pid):
            _signal_pid(pid, signal.SIGKILL)
    return pids


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
