"""Tagged teardown: a child that left the process tree is still found and stopped by its pid."""

from __future__ import annotations

import sys
import time
import uuid
from pathlib import Path

import pytest

from server.security import processes


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs Linux /proc")
def test_stop_tagged_reaches_an_orphan_in_its_own_session(tmp_path: Path) -> None:
    tag = uuid.uuid4().hex
    pid_file = tmp_path / "orphan.pid"
    # The parent starts a grandchild in a NEW session and exits at once: the grandchild is
    # reparented, outside the parent's group and tree, as Flower's superexec children are.
    script = (
        "import subprocess, sys; "
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'], "
        "start_new_session=True); "
        f"open({str(pid_file)!r}, 'w').write(str(p.pid))"
    )
    parent = processes.start_process(
        [sys.executable, "-c", script],
        tmp_path / "parent.log",
        env=processes.tagged_env(None, tag),
    )
    parent.wait(timeout=30)
    deadline = time.monotonic() + 30
    while not pid_file.exists() or not pid_file.read_text():
        assert time.monotonic() < deadline, "the grandchild never started"
        time.sleep(0.05)
    orphan = int(pid_file.read_text())
    assert processes.stop_process(parent) == 0  # the parent is gone, its tree is empty
    assert processes.tagged_pids(tag) == [orphan]  # ...but the orphan still runs
    assert processes.stop_tagged(tag, timeout=5) == [orphan]
    deadline = time.monotonic() + 10
    while processes.tagged_pids(tag):
        assert time.monotonic() < deadline, "the orphan survived stop_tagged"
        time.sleep(0.05)
    assert processes.stop_tagged(tag) == []
