"""Runs one node's ClientApp call from serialized bytes, in this process or in a worker pool.

A call crosses the same boundary a SuperNode's ClientApp process does: the message
content and the node's ``context.state`` arrive as serialized protobuf ``RecordDict``
bytes, the ClientApp runs on a fresh ``Context``, and the reply content and the updated
state go back as bytes. Worker processes (forkserver/spawn, never fork) import the
ClientApp once, run torch on one thread, and keep whatever the app caches per process
(the parsed dataset, partitions), so an idle node costs only its node id and state bytes.
"""

from __future__ import annotations

import copy
import gc
import importlib
import multiprocessing as mp
import os
import signal
import threading
import time
import traceback
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass

import psutil
from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict
from flwr.supercore.task_identity import TaskIdentity

# Error code Flower uses for an exception raised inside a ClientApp.
CLIENT_APP_RAISED_EXCEPTION = 2

RunConfig = dict[str, bool | float | int | str]


def to_bytes(records: RecordDict) -> bytes:
    """Flower's protobuf serialization of a RecordDict (what goes over the wire)."""
    return bytes(recorddict_to_proto(records).SerializeToString())


def from_bytes(data: bytes) -> RecordDict:
    proto = ProtoRecordDict()
    proto.ParseFromString(data)
    return recorddict_from_proto(proto)


class ParsedCache:
    """``from_bytes`` for bytes that repeat: the last ``size`` distinct inputs stay parsed.

    Every node of a round receives the same message content: a hit returns a deep copy of
    the kept parse (~18 us vs ~41 us to parse a small model's broadcast), an object graph
    of its own, equal to a fresh parse, that the ClientApp may change freely. Keys are
    compared by value, never by hash alone.
    """

    def __init__(self, size: int = 2) -> None:
        self.size = size
        self._kept: list[tuple[bytes, RecordDict]] = []

    def __call__(self, data: bytes) -> RecordDict:
        for i, (key, parsed) in enumerate(self._kept):
            if len(key) == len(data) and key == data:
                if i:
                    self._kept.insert(0, self._kept.pop(i))
                return copy.deepcopy(parsed)
        parsed = from_bytes(data)
        self._kept.insert(0, (bytes(data), copy.deepcopy(parsed)))  # the caller gets `parsed`
        del self._kept[self.size :]
        return parsed


# Node states differ by the round each node last took part in: only contents repeat enough.
_CONTENT = ParsedCache()


def load_client_app(ref: str) -> ClientApp:
    """Import ``"package.module:attr"`` and check it is a ClientApp."""
    module, sep, attr = ref.partition(":")
    if not sep or not module or not attr:
        raise ValueError(f"client app reference {ref!r} must look like 'package.module:attr'")
    app = getattr(importlib.import_module(module), attr, None)
    if not isinstance(app, ClientApp):
        raise ValueError(f"{ref!r} is not a flwr ClientApp")
    return app


@dataclass(frozen=True)
class NodeJob:
    """One message for one node, as bytes plus the metadata the ClientApp may read."""

    node_id: int
    partition_id: int
    num_partitions: int
    run_id: int
    message_id: str
    src_node_id: int
    message_type: str
    group_id: str
    ttl: float | None
    content: bytes  # serialized RecordDict of the message
    state: bytes  # serialized RecordDict of the node's context.state (b"" when empty)
    capacity: float = 1.0  # node config "capacity" (client.condensed.node_capacity)


@dataclass(frozen=True)
class NodeResult:
    """The ClientApp's answer: reply content bytes or an error, and the node's new state."""

    content: bytes | None
    error: tuple[int, str] | None
    state: bytes


def node_config(
    partition: int, num_partitions: int, capacity: float
) -> dict[str, bool | float | int | str]:
    """Flower's simulation node config, plus "capacity" for a node below full capacity."""
    out: dict[str, bool | float | int | str] = {
        "partition-id": partition,
        "num-partitions": num_partitions,
    }
    if capacity != 1.0:
        out["capacity"] = capacity
    return out


def execute(app: ClientApp, job: NodeJob, run_config: RunConfig) -> NodeResult:
    """Rebuild message and Context from bytes, run the ClientApp, serialize what comes back.

    As in Flower's ClientApp process, the context is returned even when the app raised
    (a state the app changed before failing is kept) and the exception becomes an Error.
    """
    msg = Message(
        _CONTENT(job.content), job.node_id, job.message_type, ttl=job.ttl, group_id=job.group_id
    )
    msg.metadata.__dict__["_message_id"] = job.message_id
    msg.metadata.__dict__["_run_id"] = job.run_id
    msg.metadata.__dict__["_src_node_id"] = job.src_node_id
    context = Context(
        run_id=job.run_id,
        node_id=job.node_id,
        # Flower's simulation engine gives each node these two node_config keys.
        node_config=node_config(job.partition_id, job.num_partitions, job.capacity),
        state=from_bytes(job.state) if job.state else RecordDict(),
        run_config=dict(run_config),
    )
    try:
        out = app(msg, context)
    except Exception as exc:  # a failing client becomes an error reply, as in Flower
        reason = f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=3)}"
        return NodeResult(None, (CLIENT_APP_RAISED_EXCEPTION, reason), to_bytes(context.state))
    state = to_bytes(context.state)
    if out.has_error():
        return NodeResult(None, (int(out.error.code), str(out.error.reason)), state)
    return NodeResult(to_bytes(out.content), None, state)


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run torch on ``n`` intra-op threads inside the block, then restore the old count.

    A simulation driver shares its cores with the client processes (pool workers, Ray
    actors), so extra threads only oversubscribe them; on the small tensors of a server's
    per-reply checks, OpenMP's fork-join then costs far more than the work (measured
    6.4 ms vs 0.23 ms per reply check on 2 busy cores).
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# --- worker processes ---------------------------------------------------------------
_WORKER: dict[str, object] = {}


def _driver_alive(pid: int, started: float) -> bool:
    """Whether the driver process still runs (a reused pid has another start time).

    A driver that died but was not reaped yet (a zombie: its parent has not waited for
    it) counts as dead, so the workers do not wait for that parent to reap it.
    """
    try:
        proc = psutil.Process(pid)
        return proc.create_time() == started and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _exit_with_driver(pid: int, started: float) -> None:
    # A SIGKILLed simulation cannot shut its pool down; its workers must not linger.
    # Watch the driver itself, not getppid(): under forkserver a worker's parent is the
    # fork server, which may outlive the driver.
    while _driver_alive(pid, started):
        time.sleep(1.0)
    os._exit(0)


def _init_worker(
    app_ref: str, run_config: RunConfig, threads: int, driver: tuple[int, float]
) -> None:
    import torch

    threading.Thread(target=_exit_with_driver, args=driver, daemon=True).start()
    # Ctrl-C reaches the whole process group: the parent stops the run, marks it
    # interrupted and shuts the pool down; a worker's own KeyboardInterrupt would only
    # print a traceback per worker over the parent's one-line message.
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    # One core per worker: N workers x 1 thread never oversubscribe N cores, and every
    # worker computes with the same (single-threaded) kernels, so where a client runs
    # cannot change its floating-point result.
    torch.set_num_threads(threads)
    # Building the first optimizer imports torch._dynamo (seconds): pay it at start-up,
    # not inside a worker's first client of round 1.
    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    _WORKER["app"] = load_client_app(app_ref)
    _WORKER["run_config"] = run_config
    freeze_startup_objects()


def freeze_startup_objects() -> None:
    """Move what start-up allocated (imports, app, model, dataset) out of the collector's
    walk, after collecting its garbage (frozen garbage would never be freed).

    The imports (torch, flwr, the app) leave ~430k objects that every full collection walks
    again: ~0.2 s of CPU each (measured). A simulation driver or worker allocates many
    short-lived objects per client; its full collections then stall a round (twice in 20
    rounds of a 1,000-client cell's driver; about every 1,200 jobs in a worker). The objects
    live for the run anyway. Pool workers call this after their start-up, the embedded and
    Ray engines' drivers once their engine has started.
    """
    gc.collect()
    gc.freeze()


def _run_in_worker(job: NodeJob) -> NodeResult:
    app = _WORKER["app"]
    assert isinstance(app, ClientApp)
    # As Flower's ClientApp process does before each call: messages built here read it.
    TaskIdentity.task_id = 1
    TaskIdentity.run_id = job.run_id
    TaskIdentity.node_id = job.node_id
    return execute(app, job, _WORKER["run_config"])  # type: ignore[arg-type]


def _run_chunk(jobs: Sequence[NodeJob]) -> list[NodeResult]:
    return [_run_in_worker(job) for job in jobs]


def chunk_sizes(n: int, workers: int) -> list[int]:
    """How ``n`` jobs are cut into chunks for ``workers`` processes.

    Chunks amortize the pipe round trip over several nodes; about 16 per worker keep the
    round's end even (a worker left with the last big chunk idles the other cores) and
    replies streaming to the server early. Each worker's first chunk is a single job and
    its second at most two, so the server gets its first reply after one client instead
    of a whole chunk and screens replies while the workers compute.
    """
    full = max(1, min(16, n // (16 * workers)))
    ramp = [1] * workers + [min(2, full)] * workers
    sizes: list[int] = []
    while n > 0:
        size = min(n, ramp[len(sizes)] if len(sizes) < len(ramp) else full)
        sizes.append(size)
        n -= size
    return sizes


def _ping(_: int) -> int:
    time.sleep(0.2)  # long enough that one worker cannot answer every ping alone
    return os.getpid()


def _this_process() -> tuple[int, float]:
    me = psutil.Process()
    return me.pid, me.create_time()


class WorkerPool:
    """``workers`` processes that each import the ClientApp once and run node jobs."""

    def __init__(self, app_ref: str, run_config: RunConfig, workers: int) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        load_client_app(app_ref)  # fail here, in one line, not inside every worker
        method = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
        self.workers = workers
        self._executor = ProcessPoolExecutor(
            max_workers=workers,
            mp_context=mp.get_context(method),
            initializer=_init_worker,
            initargs=(app_ref, dict(run_config), 1, _this_process()),
        )

    def start(self, attempts: int = 20) -> list[int]:
        """Start every worker now (imports included); return their process ids."""
        seen: set[int] = set()
        for _ in range(attempts):
            seen.update(self._executor.map(_ping, range(self.workers)))
            if len(seen) >= self.workers:
                break
        return sorted(seen)

    def run(self, jobs: Sequence[NodeJob]) -> Iterator[NodeResult]:
        """Results in job order, in chunks of `chunk_sizes` (one future per chunk); each
        chunk is submitted as soon as its jobs are read from ``jobs`` (which may build
        them on demand), so the first workers start before the last job exists."""
        futures = []
        start = 0
        try:
            for size in chunk_sizes(len(jobs), self.workers):
                chunk = [jobs[i] for i in range(start, start + size)]
                futures.append(self._executor.submit(_run_chunk, chunk))
                start += size
            for fut in futures:
                yield from fut.result()
        except BrokenProcessPool as exc:
            raise RuntimeError(
                "a simulation worker process died (out of memory?); run with --workers 0 "
                "to see the client's own error"
            ) from exc
        finally:
            for fut in futures:  # a run stopped early (e.g. Ctrl-C) leaves nothing queued
                fut.cancel()

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
