"""One recorded federated run: check it, create or resume it, run it, say how it ended.

Lifecycle: everything in the config is checked (and a resumed run's signatures and
checkpoint verified) before anything is written, so a refused run or resume leaves the store
as it was. While rounds run, a heartbeat thread stamps the run; SIGINT/SIGTERM mark it
``interrupted`` (resumable) and raise RunInterrupted; any other error marks it ``failed`` with
a one-line reason. A finished run is ``completed``, ``degraded`` (some round accepted fewer
replies than ``min-accepted-replies``) or ``failed`` (every round rejected every site).
"""

from __future__ import annotations

import logging
import math
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from types import FrameType

from flwr.serverapp import Grid

from server.errors import describe
from server.recorder import StoreRecorder, load_resume_point
from server.runner import NO_RESUME, RoundRecord, RunSummary, check_runnable, run_federated
from server.security.audit import operator
from server.security.checkpoints import check_resume
from server.security.signing import Signer
from server.store import RoundInfo, RunStore, StoreError
from server.store.liveness import HEARTBEAT_S
from server.store.urls import is_sqlite_memory
from tasks.config import ConfigError, LeanfedConfig

log = logging.getLogger(__name__)
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class RunStopped(BaseException):
    """Raised in the main thread by SIGINT/SIGTERM while a run is going (never swallowed by
    the ``except Exception`` of a client or a grid)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class RunInterrupted(KeyboardInterrupt):
    """A run stopped by a signal (or Ctrl-C), stored as ``interrupted``: resume it by id."""

    def __init__(self, run_id: str, last_round: int, cause: str) -> None:
        super().__init__(
            f"stopped after round {last_round}; resume with `leanfed simulate --resume {run_id}`"
        )
        self.run_id, self.last_round, self.cause = run_id, last_round, cause


@contextmanager
def stop_signals() -> Iterator[None]:
    """SIGINT and SIGTERM raise RunStopped while inside (main thread only; a no-op elsewhere)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, _frame: FrameType | None) -> None:
        raise RunStopped(signum)

    previous = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@contextmanager
def _shielded() -> Iterator[None]:
    # While the final status is written a second Ctrl-C must not leave the run "running".
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


class Heartbeat:
    """Stamps the run's heartbeat every ``interval`` seconds from a daemon thread.

    Rounds stamp it too (record_round); this covers long rounds, so only a dead process
    stops the heartbeat and `runs list` can call the run stale.
    """

    def __init__(self, store: RunStore, run_id: str, interval: float = HEARTBEAT_S) -> None:
        self.store, self.run_id, self.interval = store, run_id, interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Heartbeat:
        # A private in-memory SQLite shares one connection across threads: nobody else can
        # see it, so there is nothing to signal and no second writer is started.
        if not is_sqlite_memory(self.store.engine.url):
            self._thread = threading.Thread(target=self._beat, name="heartbeat", daemon=True)
            self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.store.heartbeat(self.run_id)
            except StoreError as exc:  # a busy database must not end the run
                log.warning("heartbeat of run %s not written: %s", self.run_id, exc)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


def effective_config(
    store: RunStore, cfg: LeanfedConfig, signer: Signer | None = None
) -> LeanfedConfig:
    """The config a run uses: a resumed run keeps the config it was started with.

    A resumed run's signatures are checked first (server.security.checkpoints): its
    stored config names the merge rule to import, so nothing of it is used unverified.
    """
    if not cfg.resume:
        return cfg
    run_id = store.resolve_run_id(cfg.resume)
    check_resume(store, run_id, None if signer is None else signer.verifier)
    stored = LeanfedConfig.from_run_config({**store.get_run(run_id).config, "resume": ""})
    if stored.aggregation_average != "none":
        raise ConfigError(NO_RESUME)
    return stored.replace(resume=run_id)


def final_status(rounds: Sequence[RoundInfo], min_accepted: int) -> tuple[str, str | None]:
    """(status, reason) of a run whose rounds all ran: completed, degraded or failed."""
    known = [r for r in rounds if r.num_accepted is not None]
    if known and all(r.num_accepted == 0 for r in known):
        return "failed", f"every round rejected every site ({len(known)} rounds, no update used)"
    degraded = [r.round for r in rounds if r.degraded]
    if degraded:
        shown = ", ".join(str(r) for r in degraded[:10]) + (" ..." if len(degraded) > 10 else "")
        return "degraded", (
            f"{len(degraded)} of {len(rounds)} rounds had fewer than {min_accepted} accepted "
            f"replies (rounds {shown})"
        )
    return "completed", None


def stored_rounds(store: RunStore, run_id: str) -> list[RoundRecord]:
    """The committed rounds of a run as RoundRecords (a resumed run's summary starts with them)."""
    out: list[RoundRecord] = []
    for r in store.get_rounds(run_id):
        metrics = {k: float(v) for k, v in r.metrics.items() if isinstance(v, int | float)}
        out.append(
            RoundRecord(
                round=r.round,
                accuracy=math.nan if r.accuracy is None else r.accuracy,
                loss=metrics.get("loss", math.nan),
                train_loss=r.train_loss,
                upload_bytes=r.upload_bytes,
                download_bytes=r.download_bytes,
                wall_s=r.wall_s,
                density=1.0 if r.density is None else r.density,
                num_rejected=int(metrics.get("num_rejected", 0)),
                num_accepted=r.num_accepted,
                degraded=r.degraded,
                metrics=metrics,
            )
        )
    return out


def run_recorded(
    grid: Grid,
    cfg: LeanfedConfig,
    store: RunStore,
    *,
    name: str | None = None,
    on_round: Callable[[RoundRecord], None] | None = None,
    on_start: Callable[[str, int], None] | None = None,
    signer: Signer | None = None,
    flower_run_id: int | str | None = None,
) -> tuple[str, RunSummary]:
    """Run ``cfg`` on ``grid``, committing every round; ``cfg.resume`` continues a stored run.

    ``on_start(run_id, rounds_already_done)`` is called once the run record exists;
    ``signer`` signs every checkpoint; ``flower_run_id`` links a SuperLink's run to this one.
    The returned summary holds every round of the run, a resumed run's earlier ones too.
    Raises RunInterrupted (a KeyboardInterrupt) when SIGINT/SIGTERM stopped it.
    """
    cfg = effective_config(store, cfg, signer)
    run_cfg = cfg.replace(resume="")
    check_runnable(run_cfg)  # dataset, model, rule, strategy: before any record is written
    flower_id = None if flower_run_id is None else str(flower_run_id)
    key_id = None if signer is None else signer.key_id
    who = {"by": operator(), "key_id": key_id, "flower_run_id": flower_id}
    prior: list[RoundRecord] = []
    if cfg.resume:
        run_id = cfg.resume
        store.check_resumable(run_id)
        point = load_resume_point(store, run_id, run_cfg)  # verified; raises before writing
        prior = [r for r in stored_rounds(store, run_id) if r.round <= point.round]
        store.reopen_run(run_id)  # the first write of a resume
        start, state, strategy = point.round + 1, point.state, point.strategy
        store.record_event(run_id, "run_resumed", detail={**who, "from_round": point.round})
    else:
        run_id = store.create_run(
            cfg.to_run_config(),
            seed=cfg.seed,
            name=name,
            started_by=who["by"],
            signing_key_id=key_id,
            flower_run_id=flower_id,
        )
        start, state, strategy = 1, None, None
        store.record_event(run_id, "run_started", detail=who)
    if on_start is not None:
        on_start(run_id, start - 1)
    recorder = StoreRecorder(store, run_id, signer)

    def record(rec: RoundRecord, strat: object, arrays: object) -> None:
        recorder(rec, strat, arrays)  # type: ignore[arg-type]
        if on_round is not None:
            on_round(rec)

    try:
        with Heartbeat(store, run_id), stop_signals():
            if start > cfg.num_server_rounds:
                summary = RunSummary(config=cfg)
            else:
                summary = run_federated(
                    grid, run_cfg, on_round=record, strategy=strategy,  # type: ignore[arg-type]
                    initial_state=state, start_round=start,
                )
    except (KeyboardInterrupt, RunStopped) as exc:
        cause = str(exc) if isinstance(exc, RunStopped) else "SIGINT"
        with _shielded():
            done = int(store.get_run(run_id).last_round or 0)
            store.finish_run(run_id, "interrupted", reason=f"stopped by {cause} after round {done}")
        raise RunInterrupted(run_id, done, cause) from None
    except BaseException as exc:
        with _shielded():
            store.finish_run(run_id, "failed", reason=describe(exc))
        raise
    status, reason = final_status(store.get_rounds(run_id), cfg.min_accepted_replies)
    store.finish_run(run_id, status, reason=reason)
    summary.rounds = prior + summary.rounds
    return run_id, summary
