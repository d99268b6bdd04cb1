"""Signed checkpoints end to end: a signed simulation, then every way to tamper with its store.

The attack of issue 10: a checkpoint changed in the database with its checksum recomputed
was resumed silently. Each tampering below must make `simulate --resume` and `runs show`
refuse with ONE line naming the run, and never a traceback.
"""

from __future__ import annotations

import hashlib
import io
import shutil
import sqlite3
import zlib
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from server.security.signing import ENV_VAR, generate_signing_key
from server.store import RunStore
from simulations.cli import app

CONFIG = """
num-server-rounds = 2
dataset = "digits"
model = "mlp"
num-partitions = 2
min-train-nodes = 2
local.steps = 3
"""


def _cli(*args: str) -> tuple[int, str]:
    if args[0] == "simulate":
        # Every client in this process: signing and its checks are the server's, and a
        # worker pool would start two interpreters per simulate for nothing tested here.
        args = (*args, "--workers", "0")
    res = CliRunner().invoke(app, list(args))
    return res.exit_code, res.output


@pytest.fixture(scope="module")
def signed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path | str]:
    """One signed 2-round run, its store, key and a second, foreign key."""
    root = tmp_path_factory.mktemp("signed")
    (root / "tiny.toml").write_text(CONFIG)
    key = generate_signing_key(root / "keys", "server")
    foreign = generate_signing_key(root / "keys", "foreign")
    db = root / "ref.db"
    code, out = _cli(
        "simulate", "--config", str(root / "tiny.toml"), "--db", str(db), "--no-progress",
        "--signing-key", str(key.private_key),
    )
    assert code == 0, out
    with RunStore(f"sqlite:///{db}") as store:
        (run,) = store.list_runs()
    return {"db": db, "key": key.private_key, "pub": key.public_key,
            "foreign": foreign.private_key, "run": run.id, "key_id": key.key_id}


@pytest.fixture()
def db(signed: dict[str, Path | str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private copy of the signed store, its run marked interrupted (resumable)."""
    monkeypatch.delenv(ENV_VAR, raising=False)
    path = tmp_path / "runs.db"
    shutil.copy(signed["db"], path)
    _sql(path, "UPDATE runs SET status = 'interrupted', finished_at = NULL")
    return path


def _sql(path: Path, query: str, *args: object) -> None:
    with sqlite3.connect(path) as con:
        con.execute(query, args)


def _resume(db: Path, run: str, *key: str) -> tuple[int, str]:
    extra = ["--signing-key", key[0]] if key else []
    return _cli("simulate", "--db", str(db), "--resume", run, "--no-progress", *extra)


def _refused(code: int, out: str, *needles: str) -> None:
    assert code == 1, out
    lines = out.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out, out
    for needle in needles:
        assert needle in out, out


def test_signed_run_verifies_and_resumes(signed: dict[str, Path | str], db: Path) -> None:
    run, key = str(signed["run"]), str(signed["key"])
    with RunStore(f"sqlite:///{db}") as store:
        info = store.get_run(run)
        assert info.signing_key_id == signed["key_id"] and info.started_by
        sigs = store.checkpoint_signatures(run)
        assert [c.round for c in sigs] == [1, 2]
        assert all(c.signature is not None and c.key_id == signed["key_id"] for c in sigs)
        assert [e.kind for e in store.get_events(run, kind="run_started")] == ["run_started"]
    code, out = _cli("runs", "show", run, "--db", str(db), "--signing-key", str(signed["pub"]))
    assert code == 0 and "valid: 2 checkpoints signed by" in out, out
    assert "sites" in out and "2 accepted" in out, out  # the audit trail
    code, out = _cli("runs", "show", run, "--db", str(db))
    assert code == 0 and "NOT VERIFIED" in out, out
    code, out = _resume(db, run, key)
    assert code == 0, out
    with RunStore(f"sqlite:///{db}") as store:
        assert store.get_run(run).status == "completed"
        (ev,) = store.get_events(run, kind="run_resumed")
        assert ev.detail["key_id"] == signed["key_id"] and ev.detail["from_round"] == 2


def test_checkpoint_changed_with_checksum_recomputed_is_refused(
    signed: dict[str, Path | str], db: Path
) -> None:
    run, key = str(signed["run"]), str(signed["key"])
    with sqlite3.connect(db) as con:
        (blob,) = con.execute("SELECT blob FROM checkpoints WHERE round = 2").fetchone()
    ck = torch.load(io.BytesIO(zlib.decompress(blob)), weights_only=True)
    name = next(iter(ck["state"]))
    ck["state"][name] = ck["state"][name] + 1.0  # the poisoned model
    buf = io.BytesIO()
    torch.save(ck, buf)
    raw = buf.getvalue()
    _sql(
        db, "UPDATE checkpoints SET blob = ?, sha256 = ?, size = ? WHERE round = 2",
        zlib.compress(raw), hashlib.sha256(raw).hexdigest(), len(raw),
    )
    _refused(*_resume(db, run, key), f"run {run} round 2 checkpoint", "does not match")
    _refused(*_cli("runs", "show", run, "--db", str(db), "--signing-key", key), "does not match")
    with RunStore(f"sqlite:///{db}") as store:  # a refused resume changes nothing
        assert store.get_run(run).status == "interrupted"


@pytest.mark.parametrize(
    ("query", "needle"),
    [
        # The stored config is what a resume rebuilds the strategy (and merge rule) from.
        ("UPDATE runs SET config = json_set(config, '$.\"aggregation.rule\"', 'median')",
         "does not match"),
        # The audit trail: who took part in a round.
        ("UPDATE client_results SET node_id = '666' WHERE round = 1", "does not match"),
        ("UPDATE checkpoints SET signature = NULL, key_id = NULL WHERE round = 1", "unsigned"),
    ],
)
def test_tampered_config_sites_or_stripped_signature_refused(
    signed: dict[str, Path | str], db: Path, query: str, needle: str
) -> None:
    _sql(db, query)
    _refused(*_resume(db, str(signed["run"]), str(signed["key"])), needle)


def test_key_policy(signed: dict[str, Path | str], db: Path) -> None:
    run = str(signed["run"])
    _refused(*_resume(db, run, str(signed["foreign"])), "not the configured key")
    _refused(*_resume(db, run), "is signed by", "LEANFED_SIGNING_KEY")
    # Every signature stripped: with the key configured the run is refused as unsigned ...
    _sql(db, "UPDATE checkpoints SET signature = NULL, key_id = NULL")
    _sql(db, "UPDATE runs SET signing_key_id = NULL")
    _refused(*_resume(db, run, str(signed["key"])), "recorded unsigned")
    # ... and it shows as UNSIGNED.
    code, out = _cli("runs", "show", run, "--db", str(db))
    assert code == 0 and "UNSIGNED" in out, out


def test_unsigned_run_in_store_with_signed_runs_is_refused(
    signed: dict[str, Path | str], db: Path, tmp_path: Path
) -> None:
    conf = tmp_path / "tiny.toml"
    conf.write_text(CONFIG.replace("num-server-rounds = 2", "num-server-rounds = 1"))
    code, out = _cli("simulate", "--config", str(conf), "--db", str(db), "--no-progress")
    assert code == 0, out
    with RunStore(f"sqlite:///{db}") as store:
        unsigned = next(r.id for r in store.list_runs() if r.id != signed["run"])
    _sql(db, "UPDATE runs SET status = 'interrupted' WHERE id = ?", unsigned)
    _refused(*_resume(db, unsigned), "holds signed runs")


def test_export_verifies_the_run_and_signs_its_output(
    signed: dict[str, Path | str], db: Path, tmp_path: Path
) -> None:
    from server.security.exports import verify_export
    from server.security.signing import load_verifier

    run, key = str(signed["run"]), str(signed["key"])
    out = tmp_path / "export"
    code, text = _cli("export", run, "--db", str(db), "--out", str(out), "--signing-key", key)
    assert code == 0 and "signed SIGNATURE.json" in text, text
    assert verify_export(out, load_verifier(Path(str(signed["pub"])))) >= 3
    _refused(*_cli("export", run, "--db", str(db), "--out", str(tmp_path / "e2")),
             "before exporting")
    _sql(db, "UPDATE client_results SET accepted = 0 WHERE round = 2")
    _refused(*_cli("export", run, "--db", str(db), "--out", str(tmp_path / "e3"),
                   "--signing-key", key), "does not match")
    assert not (tmp_path / "e3").exists()
