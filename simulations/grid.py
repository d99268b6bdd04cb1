"""An in-process Flower Grid: runs the real ClientApp per node without Ray or a SuperLink.

Every message crosses a real serialization boundary (Flower's protobuf ``RecordDict``
serde), so the ClientApp and the strategy never share objects, and the byte counts
are those of the serialized records, not estimates. Per-node ``Context`` objects
(with ``context.state``) persist across rounds exactly as a SuperNode keeps them.
"""

from __future__ import annotations

import logging
import random
import time
import traceback
from collections.abc import Iterable
from dataclasses import dataclass, field
from uuid import uuid4

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict
from flwr.serverapp import Grid
from flwr.supercore.run import Run, RunStatus
from flwr.supercore.task_identity import TaskIdentity

# Error code Flower uses for an exception raised inside a ClientApp.
CLIENT_APP_RAISED_EXCEPTION = 2


def quiet_flower(level: int = logging.WARNING) -> None:
    """Silence Flower's per-round INFO lines (our progress bars say the same, briefer)."""
    logging.getLogger("flwr").setLevel(level)


def _roundtrip(content: RecordDict) -> tuple[RecordDict, int]:
    """Serialize and parse a RecordDict; return the copy and its size in bytes."""
    data = recorddict_to_proto(content).SerializeToString()
    proto = ProtoRecordDict()
    proto.ParseFromString(data)
    return recorddict_from_proto(proto), len(data)


@dataclass
class TrafficLog:
    """Serialized bytes per direction, per message group (round)."""

    sent: dict[str, int] = field(default_factory=dict)  # server -> clients
    received: dict[str, int] = field(default_factory=dict)  # clients -> server

    def add(self, group: str, sent: int = 0, received: int = 0) -> None:
        self.sent[group] = self.sent.get(group, 0) + sent
        self.received[group] = self.received.get(group, 0) + received


class InProcessGrid(Grid):
    """A Grid whose nodes are in-process ClientApp calls, one Context per node."""

    def __init__(
        self,
        client_app: ClientApp,
        num_nodes: int,
        run_config: dict[str, bool | float | int | str] | None = None,
        run_id: int = 1,
        node_id_seed: int = 0,
    ) -> None:
        if num_nodes < 1:
            raise ValueError(f"num_nodes must be >= 1, got {num_nodes}")
        self.client_app = client_app
        self.run_config = dict(run_config or {})
        self._run = _make_run(run_id, self.run_config)
        # Real SuperNode ids are random unsigned 64-bit numbers; use ids of that size too so
        # code that assumes small ids fails here, not in a deployment.
        rng = random.Random(node_id_seed)
        self.node_ids = [rng.getrandbits(64) | (1 << 63) for _ in range(num_nodes)]
        # Flower's simulation engine gives each node these two node_config keys.
        self.contexts = {
            nid: Context(
                run_id=run_id,
                node_id=nid,
                node_config={"partition-id": i, "num-partitions": num_nodes},
                state=RecordDict(),
                run_config=self.run_config,
            )
            for i, nid in enumerate(self.node_ids)
        }
        self._replies: dict[str, Message] = {}
        self.traffic = TrafficLog()
        # Flower's ServerApp runtime sets this process identity before `main` runs; messages
        # built by strategies read the run id from it.
        TaskIdentity.task_id = 1
        TaskIdentity.run_id = run_id
        TaskIdentity.node_id = SUPERLINK_NODE_ID

    def partition_of(self, node_id: int) -> int:
        return int(self.contexts[node_id].node_config["partition-id"])

    # --- Grid API ---------------------------------------------------------------------
    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.node_ids)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids: list[str] = []
        for msg in messages:
            dst = msg.metadata.dst_node_id
            if dst not in self.contexts:
                raise ValueError(f"message addressed to unknown node {dst}")
            msg.metadata.__dict__["_message_id"] = str(uuid4())
            msg.metadata.__dict__["_run_id"] = self._run.run_id
            msg.metadata.__dict__["_src_node_id"] = SUPERLINK_NODE_ID
            group = msg.metadata.group_id
            content, n_sent = _roundtrip(msg.content)
            self.traffic.add(group, sent=n_sent)
            delivered = Message(
                content, dst, msg.metadata.message_type, ttl=msg.metadata.ttl, group_id=group
            )
            for key in ("_message_id", "_run_id", "_src_node_id"):
                delivered.metadata.__dict__[key] = msg.metadata.__dict__[key]
            self._replies[msg.metadata.message_id] = self._call(delivered, msg, group)
            ids.append(msg.metadata.message_id)
        return ids

    def _call(self, delivered: Message, original: Message, group: str) -> Message:
        context = self.contexts[delivered.metadata.dst_node_id]
        try:
            out = self.client_app(delivered, context)
        except Exception as exc:  # a failing client becomes an error reply, as in Flower
            reason = f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=3)}"
            return Message(
                Error(code=CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=original
            )
        if out.has_error():
            return Message(out.error, reply_to=original)
        content, n_recv = _roundtrip(out.content)
        self.traffic.add(group, received=n_recv)
        reply = Message(content, reply_to=original)
        reply.metadata.__dict__["_src_node_id"] = delivered.metadata.dst_node_id
        return reply

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(mid) for mid in list(message_ids) if mid in self._replies]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        # Clients run synchronously inside push_messages, so every reply is ready.
        return self.pull_messages(self.push_messages(messages))


def _make_run(run_id: int, config: dict[str, bool | float | int | str]) -> Run:
    now = time.strftime("%Y-%m-%dT%H:%M:%S")
    return Run(
        run_id=run_id,
        fab_id="leanfed/leanfed",
        fab_version="0.1.0",
        fab_hash="",
        override_config=dict(config),
        pending_at=now,
        starting_at=now,
        running_at=now,
        finished_at="",
        status=RunStatus(status="running", sub_status="", details=""),
        flwr_aid="",
        federation_id="",
        primary_task_id=None,
        bytes_sent=0,
        bytes_recv=0,
        clientapp_runtime=0.0,
    )
