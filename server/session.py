"""One recorded federated run: create or resume it in the store, run it, mark how it ended."""

from __future__ import annotations

from collections.abc import Callable

from flwr.serverapp import Grid

from server.recorder import StoreRecorder, load_resume_point
from server.runner import RoundRecord, RunSummary, run_federated
from server.security.audit import operator
from server.security.checkpoints import check_resume
from server.security.signing import Signer
from server.store import RunStore
from tasks.config import LeanfedConfig


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
    return stored.replace(resume=run_id)


def run_recorded(
    grid: Grid,
    cfg: LeanfedConfig,
    store: RunStore,
    *,
    name: str | None = None,
    on_round: Callable[[RoundRecord], None] | None = None,
    signer: Signer | None = None,
    flower_run_id: int | str | None = None,
) -> tuple[str, RunSummary]:
    """Run ``cfg`` on ``grid``, committing every round; ``cfg.resume`` continues a stored run.

    ``signer`` signs every checkpoint; ``flower_run_id`` links a SuperLink's run to this one.
    """
    cfg = effective_config(store, cfg, signer)
    flower_id = None if flower_run_id is None else str(flower_run_id)
    key_id = None if signer is None else signer.key_id
    who = {"by": operator(), "key_id": key_id, "flower_run_id": flower_id}
    if cfg.resume:
        run_id = cfg.resume
        store.reopen_run(run_id)
        point = load_resume_point(store, run_id, cfg.replace(resume=""))
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
    recorder = StoreRecorder(store, run_id, signer)

    def record(rec: RoundRecord, strat: object, arrays: object) -> None:
        recorder(rec, strat, arrays)  # type: ignore[arg-type]
        if on_round is not None:
            on_round(rec)

    try:
        if start > cfg.num_server_rounds:
            summary = RunSummary(config=cfg)
        else:
            summary = run_federated(
                grid, cfg.replace(resume=""), on_round=record, strategy=strategy,  # type: ignore[arg-type]
                initial_state=state, start_round=start,
            )
    except KeyboardInterrupt:
        store.finish_run(run_id, "interrupted")
        raise
    except BaseException:
        store.finish_run(run_id, "failed")
        raise
    store.finish_run(run_id, "completed")
    return run_id, summary
