"""Run lifecycle end to end: reproducible checkpoints, interrupt and resume, degraded and
failed runs, refused resumes that change nothing, config checked before any record."""

from __future__ import annotations

import hashlib
import io
import os
import signal
import zlib
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
import torch
from flwr.app import Context, Message

from client.app import app as client_app
from server.recorder import read_checkpoint
from server.session import RunInterrupted, run_recorded
from server.store import CheckpointCorruptError, RunStore, StoreError
from server.store.models import Checkpoint
from simulations.grid import InProcessGrid
from tasks.config import ConfigError, LeanfedConfig
from tasks.datasets import DatasetError
from tasks.models import ModelError
from tests.server.test_app_inprocess import TINY as APP_TINY

TINY = APP_TINY.replace(num_server_rounds=3, seed=5)


def _grid(cfg: LeanfedConfig, app: Any = client_app) -> InProcessGrid:
    return InProcessGrid(app, cfg.num_partitions, run_config=cfg.to_run_config())


def _sha(store: RunStore, run_id: str) -> str:
    found = store.checkpoint_sha256(run_id)
    assert found is not None and found[0] == TINY.num_server_rounds
    return found[1]


def _stop_after(round_: int, how: str = "ctrl-c") -> Any:
    def on_round(rec: Any) -> None:
        if rec.round == round_:
            if how == "ctrl-c":
                raise KeyboardInterrupt
            os.kill(os.getpid(), signal.SIGTERM)  # handled in this (main) thread at once

    return on_round


@pytest.fixture(scope="module")
def reference() -> str:
    """SHA-256 of the final checkpoint of an uninterrupted TINY run."""
    with RunStore("sqlite://") as store:
        run_id, _ = run_recorded(_grid(TINY), TINY, store)
        return _sha(store, run_id)


def test_identical_runs_store_identical_checkpoints(reference: str) -> None:
    with RunStore("sqlite://") as store:
        torch.manual_seed(1234)  # whatever the process RNG held before must not matter
        run_id, _ = run_recorded(_grid(TINY), TINY, store)
        assert store.get_run(run_id).status == "completed"
        assert _sha(store, run_id) == reference


@pytest.mark.parametrize(
    ("how", "after", "cause"), [("ctrl-c", 2, "SIGINT"), ("sigterm", 1, "SIGTERM")]
)
def test_interrupted_run_resumes_to_the_uninterrupted_sha(
    reference: str, tmp_path: Path, how: str, after: int, cause: str
) -> None:
    with RunStore(f"sqlite:///{tmp_path / 'r.db'}") as store:
        with pytest.raises(RunInterrupted) as stop:
            run_recorded(_grid(TINY), TINY, store, on_round=_stop_after(after, how))
        run_id = stop.value.run_id
        assert str(stop.value) == (
            f"stopped after round {after}; resume with `leanfed simulate --resume {run_id}`"
        )
        run = store.get_run(run_id)
        assert (run.status, run.reason) == (
            "interrupted",
            f"stopped by {cause} after round {after}",
        )
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # handlers restored

        torch.manual_seed(99)
        started: list[int] = []
        rid, summary = run_recorded(
            _grid(TINY),
            TINY.replace(resume=run_id[:8]),
            store,
            on_start=lambda _id, done: started.append(done),
        )
        assert rid == run_id and started == [after]
        assert [r.round for r in summary.rounds] == [1, 2, 3]  # earlier rounds included
        assert store.get_run(run_id).status == "completed"
        assert _sha(store, run_id) == reference


def _forge(store: RunStore, run_id: str, raw: bytes) -> None:
    """Replace the newest checkpoint by `raw` with a matching SHA-256: only parsing can tell."""
    with store.engine.begin() as conn:
        last = conn.execute(
            sa.select(sa.func.max(Checkpoint.round)).where(Checkpoint.run_id == run_id)
        ).scalar_one()
        conn.execute(
            sa.update(Checkpoint)
            .where(Checkpoint.run_id == run_id, Checkpoint.round == last)
            .values(blob=zlib.compress(raw), sha256=hashlib.sha256(raw).hexdigest(), size=len(raw))
        )


def _torch_bytes(obj: object) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


@pytest.fixture(scope="module")
def interrupted_db(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A SQLite file holding one TINY run interrupted after round 1."""
    path = tmp_path_factory.mktemp("interrupted") / "r.db"
    with RunStore(f"sqlite:///{path}") as store, pytest.raises(RunInterrupted) as stop:
        run_recorded(_grid(TINY), TINY, store, on_round=_stop_after(1))
    return path, stop.value.run_id


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        (b"PK\x03\x04 not really a checkpoint", "is unreadable: not a leanfed checkpoint"),
        (_torch_bytes([1, 2, 3]), "top level is list"),
        (_torch_bytes({"format": 2, "round": 1, "state": {"w": torch.zeros(2)}}), "parameter"),
    ],
)
def test_forged_checkpoint_refused_in_one_line_and_status_kept(
    tmp_path: Path, interrupted_db: tuple[Path, str], raw: bytes, match: str
) -> None:
    path, run_id = interrupted_db
    copy = tmp_path / "copy.db"
    copy.write_bytes(path.read_bytes())
    with RunStore(f"sqlite:///{copy}") as store:
        _forge(store, run_id, raw)
        with pytest.raises(CheckpointCorruptError, match=match) as err:
            run_recorded(_grid(TINY), TINY.replace(resume=run_id), store)
        assert "\n" not in str(err.value)
        run = store.get_run(run_id)
        assert (run.status, run.reason) == ("interrupted", "stopped by SIGINT after round 1")


def test_read_checkpoint_checks_shapes_and_finiteness() -> None:
    ref = {"w": torch.zeros(2, 3), "b": torch.zeros(3)}
    good = {"format": 2, "round": 1, "state": {"w": torch.ones(2, 3), "b": torch.ones(3)}}
    assert read_checkpoint(_torch_bytes(good), "ck", ref)["round"] == 1
    wrong = {**good, "state": {"w": torch.ones(3, 2), "b": torch.ones(3)}}
    with pytest.raises(CheckpointCorruptError, match=r"w is not a torch.float32 tensor"):
        read_checkpoint(_torch_bytes(wrong), "ck", ref)
    nan = {**good, "state": {"w": torch.full((2, 3), float("nan")), "b": torch.ones(3)}}
    with pytest.raises(CheckpointCorruptError, match="NaN"):
        read_checkpoint(_torch_bytes(nan), "ck", ref)
    mask = {**good, "mask": {"w": torch.ones(2, 3)}, "mask_version": 0, "target_densities": {}}
    with pytest.raises(CheckpointCorruptError, match="mask of w"):
        read_checkpoint(_torch_bytes(mask), "ck", ref)


def _failing_app(bad_partitions: set[int]) -> Any:
    """The real ClientApp, except that the sites in `bad_partitions` fail every train call."""

    def app(message: Message, context: Context) -> Message:
        if message.metadata.message_type == "train" and (
            int(context.node_config["partition-id"]) in bad_partitions
        ):
            raise RuntimeError("site down")
        return client_app(message, context)

    return app


def test_run_whose_every_round_rejected_every_site_fails() -> None:
    cfg = TINY.replace(num_server_rounds=2)
    with RunStore("sqlite://") as store:
        run_id, _ = run_recorded(_grid(cfg, _failing_app({0, 1, 2, 3})), cfg, store)
        run = store.get_run(run_id)
        assert run.status == "failed"
        assert run.reason == "every round rejected every site (2 rounds, no update used)"
        assert [(r.num_accepted, r.degraded) for r in store.get_rounds(run_id)] == [(0, True)] * 2


def test_rounds_below_min_accepted_replies_mark_the_run_degraded() -> None:
    cfg = TINY.replace(num_server_rounds=1, fraction_train=1.0, min_accepted_replies=4)
    with RunStore("sqlite://") as store:
        run_id, summary = run_recorded(_grid(cfg, _failing_app({0})), cfg, store)
        run = store.get_run(run_id)
        assert run.status == "degraded"
        assert run.reason == "1 of 1 rounds had fewer than 4 accepted replies (rounds 1)"
        assert [(r.num_accepted, r.degraded) for r in summary.rounds] == [(3, True)]
        with pytest.raises(StoreError, match="already degraded"):
            run_recorded(_grid(cfg), cfg.replace(resume=run_id), store)
        assert store.get_run(run_id).status == "degraded"


@pytest.mark.parametrize(
    ("changes", "error", "match"),
    [
        ({"dataset": "no-such-set"}, DatasetError, "dataset = 'no-such-set': unknown dataset"),
        ({"model": "no-such-model"}, ModelError, "model = 'no-such-model': unknown model"),
        ({"aggregation_rule": "nowhere:rule"}, ConfigError, "no module named 'nowhere'"),
    ],
)
def test_config_checked_before_a_run_record_exists(
    changes: dict[str, Any], error: type[Exception], match: str
) -> None:
    with RunStore("sqlite://") as store:
        grid = _grid(TINY)
        with pytest.raises(error, match=match):
            run_recorded(grid, TINY.replace(**changes), store)
        assert store.list_runs() == [] and grid.traffic.sent == {}


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"min_train_nodes": 5}, "min-train-nodes = 5: above num-partitions = 4"),
        ({"min_accepted_replies": 3}, "min-accepted-replies = 3: above the 2 nodes sampled"),
    ],
)
def test_impossible_sampling_is_a_config_error(changes: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        TINY.replace(**changes)
