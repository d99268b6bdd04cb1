"""The audit trail of a run, read from the store: who started or resumed it and with which key,
which sites took part in each round, rejections, privacy parameters. Never data or updates.

Everything shown here is already in the store (runs, events, client_results, the config);
the checkpoint signatures (server.security.checkpoints) cover each round's site list.
"""

from __future__ import annotations

import getpass
import socket
from dataclasses import dataclass

from server.store import RunStore

SITES_SHOWN = 8  # node ids listed per round; the store keeps them all
PRIVACY_PREFIXES = ("dp.", "privacy.", "secure.", "secagg.")  # run-config keys shown
AUDIT_EVENTS = ("run_started", "run_resumed")


def operator() -> str:
    """``user@host`` of this process, for the record of who started a run."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no USER variable and no passwd entry (containers)
        user = "unknown"
    return f"{user}@{socket.gethostname()}"[:200]


@dataclass(frozen=True)
class AuditEntry:
    """One line of the audit trail."""

    round: int | None  # None: run-level
    what: str
    detail: str


def _ids(ids: list[str]) -> str:
    shown = ", ".join(ids[:SITES_SHOWN])
    return shown + (f" (+{len(ids) - SITES_SHOWN} more)" if len(ids) > SITES_SHOWN else "")


def audit_trail(store: RunStore, run_id: str) -> list[AuditEntry]:
    """Run-level entries first, then per round: sites that took part and rejections."""
    run = store.get_run(run_id)
    out = [
        AuditEntry(
            None,
            "created",
            f"by {run.started_by or 'unknown'}; checkpoints "
            + (f"signed by {run.signing_key_id}" if run.signing_key_id else "unsigned")
            + (f"; Flower run {run.flower_run_id}" if run.flower_run_id else ""),
        )
    ]
    for e in store.get_events(run_id):
        if e.kind == "run_resumed":
            d = e.detail
            key = d.get("key_id") or "no key"
            flwr = f"; Flower run {d['flower_run_id']}" if d.get("flower_run_id") else ""
            out.append(
                AuditEntry(None, "resumed", f"by {d.get('by')} after round {d.get('from_round')}"
                           f" with {key}{flwr}")
            )
    privacy = {k: v for k, v in run.config.items() if k.startswith(PRIVACY_PREFIXES)}
    if privacy:
        out.append(
            AuditEntry(None, "privacy", ", ".join(f"{k}={v}" for k, v in sorted(privacy.items())))
        )
    by_round: dict[int, list[tuple[str, bool, str | None]]] = {}
    for c in store.get_client_results(run_id):
        by_round.setdefault(c.round, []).append((c.node_id, c.accepted, c.reason))
    for rnd in sorted(by_round):
        rows = by_round[rnd]
        accepted = [n for n, ok, _ in rows if ok]
        out.append(AuditEntry(rnd, "sites", f"{len(accepted)} accepted: {_ids(accepted)}"))
        for node, ok, reason in rows:
            if not ok:
                out.append(AuditEntry(rnd, "rejected", f"node {node}: {reason or 'no reason'}"))
    for e in store.get_events(run_id):
        if e.kind not in AUDIT_EVENTS and ("reject" in e.kind or "abort" in e.kind):
            node = f"node {e.node_id}: " if e.node_id else ""
            out.append(AuditEntry(e.round, e.kind, f"{node}{e.detail}"))
    return out
