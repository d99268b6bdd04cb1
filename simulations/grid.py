"""An in-process Flower Grid: runs the real ClientApp per node without Ray or a SuperLink.

Every message crosses a real serialization boundary (Flower's protobuf ``RecordDict``
serde), so the ClientApp and the strategy never share objects, and the byte counts
are those of the serialized records, not estimates. Each node's ``context.state``
persists across rounds as a SuperNode keeps it, stored between calls as serialized
bytes, so an idle node costs only its id and its state. With ``workers >= 1`` the
clients of a round run in parallel on a pool of worker processes
(:mod:`simulations.pool`); replies come back in message order, so results do not
depend on the number of workers.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any
from uuid import uuid4

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid
from flwr.supercore.run import Run, RunStatus
from flwr.supercore.task_identity import TaskIdentity

from simulations.pool import (
    NodeJob,
    NodeResult,
    WorkerPool,
    execute,
    freeze_startup_objects,
    from_bytes,
    load_client_app,
    node_config,
    to_bytes,
    torch_threads,
)


def quiet_flower(level: int = logging.WARNING) -> None:
    """Silence Flower's per-round INFO lines (our progress bars say the same, briefer)."""
    logging.getLogger("flwr").setLevel(level)


@dataclass
class TrafficLog:
    """Serialized bytes per direction, per message group (round)."""

    sent: dict[str, int] = field(default_factory=dict)  # server -> clients
    received: dict[str, int] = field(default_factory=dict)  # clients -> server

    def add(self, group: str, sent: int = 0, received: int = 0) -> None:
        self.sent[group] = self.sent.get(group, 0) + sent
        self.received[group] = self.received.get(group, 0) + received


class _ContextView(Mapping[int, Context]):
    """Read-only ``node_id -> Context`` view, rebuilt from the stored state bytes."""

    def __init__(self, grid: InProcessGrid) -> None:
        self._grid = grid

    def __getitem__(self, node_id: int) -> Context:
        return self._grid.context(node_id)

    def __iter__(self) -> Iterator[int]:
        return iter(self._grid.node_ids)

    def __len__(self) -> int:
        return len(self._grid.node_ids)


class InProcessGrid(Grid):
    """A Grid whose nodes are ClientApp calls in this process or in ``workers`` processes.

    ``client_app`` is a ClientApp, or an import reference ``"module:attr"`` to one; a pool
    of workers needs the reference (each worker imports the app itself).
    """

    def __init__(
        self,
        client_app: ClientApp | str,
        num_nodes: int,
        run_config: dict[str, bool | float | int | str] | None = None,
        run_id: int = 1,
        node_id_seed: int = 0,
        workers: int = 0,
        capacities: Sequence[float] | None = None,
    ) -> None:
        if num_nodes < 1:
            raise ValueError(f"num_nodes must be >= 1, got {num_nodes}")
        if workers < 0:
            raise ValueError(f"workers must be >= 0, got {workers}")
        if workers > 0 and not isinstance(client_app, str):
            raise ValueError("workers >= 1 needs the ClientApp as a reference 'module:attr'")
        self.client_app = load_client_app(client_app) if isinstance(client_app, str) else client_app
        self.run_config = dict(run_config or {})
        self._run = _make_run(run_id, self.run_config)
        # Real SuperNode ids are random unsigned 64-bit numbers; use ids of that size too so
        # code that assumes small ids fails here, not in a deployment.
        rng = random.Random(node_id_seed)
        self.node_ids = [rng.getrandbits(64) | (1 << 63) for _ in range(num_nodes)]
        self._partition = {nid: i for i, nid in enumerate(self.node_ids)}
        # per partition: the node config "capacity" (clients of different width)
        self.capacities = [1.0] * num_nodes if capacities is None else list(capacities)
        if len(self.capacities) != num_nodes:
            raise ValueError(f"capacities: {len(self.capacities)} values for {num_nodes} nodes")
        self._states: dict[int, bytes] = {}  # only nodes whose state is not empty
        self._replies: dict[str, Message] = {}
        # Called with every reply as it arrives, while later nodes of the push still run
        # (a strategy screens train replies here: strategies.aggregation.early).
        self.reply_listeners: list[Callable[[Message], None]] = []
        self.traffic = TrafficLog()
        self.pool = (
            WorkerPool(client_app, self.run_config, workers)
            if isinstance(client_app, str) and workers > 0
            else None
        )
        # With a pool the server shares the cores with the workers: one torch thread here too
        # (restored on close), as each worker has.
        self._threads = ExitStack()
        if self.pool is not None:
            self._threads.enter_context(torch_threads(1))
        # Flower's ServerApp runtime sets this process identity before `main` runs; messages
        # built by strategies read the run id from it.
        TaskIdentity.task_id = 1
        TaskIdentity.run_id = run_id
        TaskIdentity.node_id = SUPERLINK_NODE_ID

    @property
    def workers(self) -> int:
        return 0 if self.pool is None else self.pool.workers

    def start(self) -> None:
        """Start the worker processes now rather than on the first round."""
        if self.pool is not None:
            self.pool.start()
        freeze_startup_objects()

    def close(self) -> None:
        """Stop the worker processes (if any); node states stay readable."""
        if self.pool is not None:
            self.pool.close()
            self.pool = None
        self._threads.close()

    def __enter__(self) -> InProcessGrid:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def partition_of(self, node_id: int) -> int:
        return self._partition[node_id]

    def state_bytes(self, node_id: int) -> bytes:
        """The node's ``context.state`` as serialized between its calls (b"" when empty)."""
        return self._states.get(node_id, b"")

    def context(self, node_id: int) -> Context:
        """The node's Context as its ClientApp would receive it next."""
        state = self.state_bytes(node_id)
        return Context(
            run_id=self._run.run_id,
            node_id=node_id,
            node_config=node_config(
                self._partition[node_id],
                len(self.node_ids),
                self.capacities[self._partition[node_id]],
            ),
            state=from_bytes(state) if state else RecordDict(),
            run_config=dict(self.run_config),
        )

    @property
    def contexts(self) -> Mapping[int, Context]:
        return _ContextView(self)

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
        pending: list[Message] = []
        for msg in messages:
            dst = msg.metadata.dst_node_id
            if dst not in self._partition:
                raise ValueError(f"message addressed to unknown node {dst}")
            msg.metadata.__dict__["_message_id"] = str(uuid4())
            msg.metadata.__dict__["_run_id"] = self._run.run_id
            msg.metadata.__dict__["_src_node_id"] = SUPERLINK_NODE_ID
            pending.append(msg)
        # A node receiving two messages in one push runs them one after the other, in
        # order (its state passes from the first call to the second): split into waves.
        for wave in _waves(pending):
            # Jobs are serialized as the pool asks for them: the first clients start while
            # the driver still serializes the round's later messages.
            jobs = _Lazy(wave, self._serialize)
            for i, result in enumerate(self._execute(jobs)):
                reply = self._reply(jobs[i], wave[i], result)
                self.observe(reply)
                for listen in self.reply_listeners:
                    listen(reply)
                self._replies[wave[i].metadata.message_id] = reply
        return [msg.metadata.message_id for msg in pending]

    def _serialize(self, msg: Message) -> NodeJob:
        content = to_bytes(msg.content)
        self.traffic.add(msg.metadata.group_id, sent=len(content))
        return self._job(msg, content)

    def observe(self, reply: Message) -> None:
        """Called with every reply as it arrives (subclasses count metrics here)."""

    def _job(self, msg: Message, content: bytes) -> NodeJob:
        md = msg.metadata
        return NodeJob(
            node_id=md.dst_node_id,
            partition_id=self._partition[md.dst_node_id],
            num_partitions=len(self.node_ids),
            run_id=md.run_id,
            message_id=md.message_id,
            src_node_id=md.src_node_id,
            message_type=md.message_type,
            group_id=md.group_id,
            ttl=md.ttl,
            content=content,
            state=self.state_bytes(md.dst_node_id),
            capacity=self.capacities[self._partition[md.dst_node_id]],
        )

    def _execute(self, jobs: Sequence[NodeJob]) -> Iterable[NodeResult]:
        if self.pool is None:
            return (execute(self.client_app, jobs[i], self.run_config) for i in range(len(jobs)))
        return self.pool.run(jobs)

    def _reply(self, job: NodeJob, original: Message, result: NodeResult) -> Message:
        if result.state:
            self._states[job.node_id] = result.state
        else:
            self._states.pop(job.node_id, None)
        if result.error is not None:
            code, reason = result.error
            return Message(Error(code=code, reason=reason), reply_to=original)
        assert result.content is not None
        self.traffic.add(job.group_id, received=len(result.content))
        reply = Message(from_bytes(result.content), reply_to=original)
        reply.metadata.__dict__["_src_node_id"] = job.node_id
        return reply

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(mid) for mid in list(message_ids) if mid in self._replies]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        # Clients finish inside push_messages, so every reply is ready.
        return self.pull_messages(self.push_messages(messages))


class _Lazy(Sequence[NodeJob]):
    """A round's jobs, each built (serialized) from its message once, when first asked for."""

    def __init__(self, messages: list[Message], build: Callable[[Message], NodeJob]) -> None:
        self._messages, self._build = messages, build
        self._jobs: list[NodeJob | None] = [None] * len(messages)

    def __len__(self) -> int:
        return len(self._messages)

    def __getitem__(self, i: int) -> NodeJob:  # type: ignore[override]
        job = self._jobs[i]
        if job is None:
            job = self._jobs[i] = self._build(self._messages[i])
        return job


def _waves(items: list[Message]) -> list[list[Message]]:
    """Split into consecutive groups in which no node appears twice (usually one group)."""
    waves: list[list[Message]] = [[]]
    seen: set[int] = set()
    for item in items:
        dst = item.metadata.dst_node_id
        if dst in seen:
            waves.append([])
            seen = set()
        waves[-1].append(item)
        seen.add(dst)
    return waves


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


class DropoutGrid(InProcessGrid):
    """An InProcessGrid whose nodes vanish mid-round: some replies of one message type are lost.

    Every batch of ``message_type`` messages loses the replies of ``drop_nodes`` plus a seeded
    ``drop_fraction`` of its destinations, as a timeout would (the clients still ran). With
    ``record`` every reply that does reach the server is kept in ``received``.
    """

    def __init__(  # noqa: PLR0913 - InProcessGrid's arguments plus the fault model
        self,
        client_app: ClientApp,
        num_nodes: int,
        *,
        drop_fraction: float = 0.0,
        drop_nodes: Iterable[int] = (),
        message_type: str = "train",
        record: bool = False,
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(client_app, num_nodes, **kwargs)
        if not 0.0 <= drop_fraction < 1.0:
            raise ValueError(f"drop_fraction must be in [0, 1), got {drop_fraction}")
        self.drop_fraction, self.drop_nodes = drop_fraction, set(drop_nodes)
        self.message_type, self.record = message_type, record
        self.received: list[Message] = []
        self.lost: list[int] = []  # node ids whose replies were lost, in order
        self._rng = random.Random(seed)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        messages = list(messages)
        targets = sorted(
            {
                m.metadata.dst_node_id
                for m in messages
                if m.metadata.message_type == self.message_type
            }
        )
        lose = self.drop_nodes & set(targets)
        if targets and self.drop_fraction > 0:
            lose |= set(self._rng.sample(targets, int(self.drop_fraction * len(targets))))
        self.lost += sorted(lose)
        replies = [
            r
            for r in super().send_and_receive(messages, timeout=timeout)
            if not (r.metadata.message_type == self.message_type and r.metadata.src_node_id in lose)
        ]
        if self.record:
            self.received.extend(replies)
        return replies
