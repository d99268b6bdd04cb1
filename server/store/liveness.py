"""Is a "running" run still being written? Heartbeat age and, on this host, the writer's pid."""

from __future__ import annotations

import os
import socket
from datetime import datetime, timedelta

from server.store.models import utcnow

# A running run writes its heartbeat every round and every HEARTBEAT_S seconds in between; one
# silent for STALE_AFTER_S (or whose process on this host is gone) is shown as "stale".
HEARTBEAT_S = 30.0
STALE_AFTER_S = 120.0


def this_owner() -> str:
    """"host:pid" of this process, stored with a run it writes."""
    return f"{socket.gethostname()[:80]}:{os.getpid()}"


def _owner_dead(owner: str | None) -> bool:
    """True when `owner` names a process on this host that no longer exists."""
    if not owner or ":" not in owner:
        return False
    host, _, pid = owner.rpartition(":")
    if host != socket.gethostname()[:80] or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OverflowError, OSError):
        return False
    return False


def is_stale(
    status: str, heartbeat_at: datetime | None, owner: str | None, now: datetime | None = None
) -> bool:
    """A "running" run whose writer is gone: heartbeat older than STALE_AFTER_S, or dead pid."""
    if status != "running":
        return False
    if _owner_dead(owner):
        return True
    if heartbeat_at is None:
        return False
    now = now or utcnow()
    return now - heartbeat_at > timedelta(seconds=STALE_AFTER_S)
