"""The server's transcript of one SecAgg+ round, its stage exchange and its stage-reply checks.

Split out of `secagg` (the strategy keeps the round flow): the public state of one round
(`Round`), one query exchange with every node (`exchange`), and the hostile-input checks of
the advertise, share and unmask replies (wire layout: `secagg_wire`; maths: `strategies.secure`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from strategies.aggregation import secagg_wire as W
from strategies.privacy.distributed import DPSumPlan
from strategies.secure import protocol as P
from strategies.secure import shamir
from strategies.secure.crypto import KEY_BYTES, NONCE_BYTES, TAG_BYTES, SecAggError
from strategies.secure.sparse_sum import SparseSumPlan

__all__ = [
    "CIPHERTEXT_BYTES",
    "Round",
    "RoundAborted",
    "SumPlan",
    "collect_shares",
    "exchange",
    "read_keys",
    "read_shares",
]

# nonce + (header: src, dst, round = 24 B) + two shares + Poly1305 tag
CIPHERTEXT_BYTES = NONCE_BYTES + 24 + 2 * shamir.SHARE_BYTES + TAG_BYTES
SumPlan = SparseSumPlan | DPSumPlan  # what the round sums: weighted updates or DP-noised ones


class RoundAborted(Exception):
    """The secure round cannot complete; the message says why."""


@dataclass
class Round:
    """The public transcript of one secure round, as the server holds it."""

    round: int
    c_pks: dict[int, bytes] = field(default_factory=dict)
    s_pks: dict[int, bytes] = field(default_factory=dict)
    groups: dict[int, tuple[int, ...]] = field(default_factory=dict)
    thresholds: dict[int, int] = field(default_factory=dict)
    u1: set[int] = field(default_factory=set)
    plan: SumPlan | None = None
    stage_bytes: dict[int, int] = field(default_factory=dict)  # node -> download bytes
    upload: dict[int, int] = field(default_factory=dict)  # node -> upload bytes
    failed: dict[int, str] = field(default_factory=dict)  # node -> why it left the round
    aborted: str | None = None  # why the round was abandoned


def exchange(
    grid: Grid, rs: Round, action: str, records: dict[int, ConfigRecord], timeout: float
) -> dict[int, ConfigRecord]:
    """Send one stage record per node; return the well-formed replies by node."""
    messages = []
    for node, rec in records.items():
        rs.stage_bytes[node] = rs.stage_bytes.get(node, 0) + W.record_bytes(rec)
        content = RecordDict({W.RECORD: rec})
        messages.append(Message(content, node, f"query.{action}", group_id=str(rs.round)))
    out: dict[int, ConfigRecord] = {}
    for reply in grid.send_and_receive(messages, timeout=timeout):
        node = int(reply.metadata.src_node_id)
        if node not in records or node in out:
            continue
        if reply.has_error():
            rs.failed[node] = f"{action}: error reply ({reply.error.code})"
            continue
        got = W.stage_record(reply.content)
        if got is None:
            rs.failed[node] = f"{action}: no secagg record"
            continue
        rs.upload[node] = rs.upload.get(node, 0) + W.record_bytes(got)
        out[node] = got
    for node in records:
        if node not in out:
            rs.failed.setdefault(node, f"{action}: no reply")
    return out


def read_keys(rs: Round, replies: dict[int, ConfigRecord]) -> None:
    """Stage 0 replies: keep each node's two 32-byte public keys, or say why not."""
    for node, rec in replies.items():
        try:
            c_pk, s_pk = W.get_bytes(rec, "c-pk"), W.get_bytes(rec, "s-pk")
            if len(c_pk) != KEY_BYTES or len(s_pk) != KEY_BYTES:
                raise ValueError("public keys must be 32 bytes")
        except ValueError as exc:
            rs.failed[node] = f"advertise: {exc}"
            continue
        rs.c_pks[node], rs.s_pks[node] = c_pk, s_pk


def read_shares(
    rs: Round, replies: dict[int, ConfigRecord], inbox: dict[int, dict[int, bytes]]
) -> None:
    """Stage 1 replies: one ciphertext per neighbour, filed in ``inbox[dst][src]``; the
    senders join U1."""
    for node, rec in replies.items():
        neighbours = [j for j in rs.groups[node] if j != node]
        try:
            dst = P.ids_from_bytes(W.get_bytes(rec, "dst"), len(neighbours))
            cts = W.get_bytes_list(rec, "ct", len(neighbours), CIPHERTEXT_BYTES)
            if sorted(dst) != neighbours:
                raise ValueError("shares are not addressed to exactly the neighbours")
        except (ValueError, SecAggError) as exc:
            rs.failed[node] = f"share: {exc}"
            continue
        rs.u1.add(node)
        for j, ct in zip(dst, cts, strict=True):
            inbox[j][node] = ct


def collect_shares(
    rs: Round, replies: dict[int, ConfigRecord], survivors: set[int]
) -> dict[int, dict[int, list[bytes]]]:
    """Stage 3 replies: kind -> src -> the shares held for src (malformed replies skipped)."""
    shares: dict[int, dict[int, list[bytes]]] = {P.B_SHARE: {}, P.SK_SHARE: {}}
    for node, rec in replies.items():
        with contextlib.suppress(ValueError, SecAggError):
            srcs = P.ids_from_bytes(W.get_bytes(rec, "src"), len(rs.groups[node]))
            kinds = W.get_bytes(rec, "kind")
            got = W.get_bytes_list(rec, "shares", len(srcs), shamir.SHARE_BYTES)
            if len(kinds) != len(srcs):
                continue
            for src, kind, share in zip(srcs, kinds, got, strict=True):
                # only shares a node can hold, of the kind the server asked for
                expect = P.B_SHARE if src in survivors else P.SK_SHARE
                if src in rs.groups and node in rs.groups[src] and kind == expect:
                    shares[kind].setdefault(src, []).append(share)
    return shares
