"""Tagged teardown: a child that left the process tree is still found and stopped by its pid."""

from __future__ import annotations

import contextlib
import sys
import uuid
from pathlib import Path

import psutil
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
    # The parent writes the pid right after Popen returns and before it exits, so once it
    # has exited the file is complete: no polling needed.
    assert parent.wait(timeout=60) == 0
    orphan = int(pid_file.read_text())
    assert processes.stop_process(parent) == 0  # the parent is gone, its tree is empty
    assert processes.tagged_pids(tag) == [orphan]  # ...but the orphan still runs
    assert processes.stop_tagged(tag, timeout=5) == [orphan]
    # Not our child (init reaped it), so wait on the pid itself; the timeout only guards
    # against a hang, the check is that the process is gone and no tagged pid remains.
    with contextlib.suppress(psutil.NoSuchProcess):
        psutil.Process(orphan).wait(timeout=120)
    assert processes.tagged_pids(tag) == []
    assert processes.stop_tagged(tag) == []
