"""`leanfed runs list|show|delete|upgrade` and `leanfed report`: the run store from the CLI.

`list`, `show` and `report` are read-only: they open the database read-only, never create or
migrate a table, and refuse a database that is not a leanfed store at this schema revision.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from enum import StrEnum
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from server.security.audit import audit_trail
from server.security.checkpoints import signature_status
from server.security.exports import check_export, sign_export
from server.security.signing import is_private_key_file, key_path, load_signer, verifier_from
from server.store import RunInfo, RunStore, StoreError, resolve_db_url
from simulations.continual_summary import cl_summary, format_cl, task_rows
from simulations.edge import new_app, print_error
from simulations.report import settings

DbOption = Annotated[
    str | None,
    typer.Option(
        "--db",
        help="Database URL (sqlite:///FILE or postgresql://USER@HOST:PORT/DB) or a SQLite file; "
        "default $LEANFED_DB_URL, else ./leanfed.db.",
        show_default=False,
    ),
]
KeyOption = Annotated[
    str | None,
    typer.Option(
        "--signing-key",
        help="Signing key (private or .pub) to verify checkpoint signatures; "
        "default $LEANFED_SIGNING_KEY.",
        show_default=False,
    ),
]
RunIdArg = Annotated[
    str,
    typer.Argument(
        help="Run id, a unique prefix of at least 4 chars, or flwr:ID (Flower's run id)."
    ),
]

ID_SHOWN = 12  # hex chars of the run id shown by `runs list` (48 bits: unique in practice)

runs_app = new_app(no_args_is_help=True, help="Inspect stored runs.")


@contextmanager
def _open(db: str | None, *, read_only: bool = True) -> Iterator[RunStore]:
    """Open the store (read-only unless asked); StoreError -> one red line on stderr, exit 1."""
    try:
        store = RunStore(resolve_db_url(db), must_exist=True, read_only=read_only)
    except StoreError as exc:
        _fail(str(exc))
    try:
        yield store
    except StoreError as exc:
        _fail(str(exc))
    finally:
        store.close()


def _fail(message: str) -> NoReturn:
    print_error(message)
    raise typer.Exit(code=1)


def _resolve(store: RunStore, run_id: str) -> str:
    """A leanfed run id (or prefix), or ``flwr:ID``: the run a SuperLink's run id recorded."""
    if not run_id.startswith("flwr:"):
        return store.resolve_run_id(run_id)
    flwr_id = run_id.removeprefix("flwr:").strip()
    found = [r.id for r in store.list_runs() if r.flower_run_id == flwr_id]
    if len(found) != 1:
        _fail(f"{len(found)} leanfed runs record Flower run id {flwr_id!r} in {store.url}")
    return found[0]


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _metric(key: str, value: object) -> str:
    """Counts (bytes, clients, flags) as integers; rates and losses with four decimals."""
    if isinstance(value, float) and value.is_integer() and not _is_rate(key):
        return str(int(value))
    return _fmt(value) if isinstance(value, float) else str(value)


def _is_rate(key: str) -> bool:
    words = set(key.replace(".", "_").replace("-", "_").split("_"))
    return bool(words & {"accuracy", "acc", "loss", "density", "norm", "fraction", "lr"})



@runs_app.command("list")
def list_runs(db: DbOption = None) -> None:
    """Table of stored runs, newest first."""
    with _open(db) as store:
        runs = store.list_runs()
    console = Console()
    if not runs:
        console.print("no runs stored")
        return
    table = Table(
        title=f"runs in {store.url}",
        caption="ids are shortened; any unique prefix of 4+ characters works in show/report",
    )
    table.add_column("id", no_wrap=True)
    table.add_column("name", min_width=8)
    table.add_column("status", min_width=9)
    table.add_column("rounds", justify="right")
    table.add_column("final accuracy", justify="right")
    for col in ("dataset", "model", "strategy", "DST rule", "density"):
        table.add_column(col, overflow="fold")
    table.add_column("created", no_wrap=True)
    for r in runs:
        table.add_row(
            r.id[:ID_SHOWN],
            r.name,
            r.display_status,
            str(r.num_rounds),
            _fmt(r.final_accuracy),
            *(escape(v) for v in settings(r.config).values()),
            r.created_at.strftime("%Y-%m-%d %H:%M"),
        )
    console.print(table)


@runs_app.command("show")
def show_run(run_id: RunIdArg, db: DbOption = None, signing_key: KeyOption = None) -> None:
    """Status, rounds, final metrics, the final checkpoint's SHA-256 and signature, audit."""
    with _open(db) as store:
        full_id = _resolve(store, run_id)
        run = store.get_run(full_id)
        rounds = store.get_rounds(full_id)
        # Signatures first (a bad one refuses the run), then load the final checkpoint:
        # a blob that does not match its recorded hash fails here, loudly.
        signature = signature_status(store, full_id, verifier_from(signing_key))
        ckpt = store.latest_checkpoint(full_id)
        sha = store.checkpoint_sha256(full_id)
        audit = audit_trail(store, full_id)
    console = Console(highlight=False)
    table = Table(show_header=False, title=f"run {run.id}")
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")  # fold, never truncate, the SHA-256
    table.add_row("name", run.name)
    table.add_row("status", _status_line(run))
    if run.reason:
        table.add_row("reason", escape(run.reason))
    degraded = [r.round for r in rounds if r.degraded]
    if degraded:
        table.add_row("degraded rounds", _round_list(degraded))
    for key, value in settings(run.config).items():
        table.add_row(key, escape(value))
    table.add_row("seed", str(run.seed))
    table.add_row("code version", run.code_version)
    table.add_row("Flower run id", run.flower_run_id or "-")
    table.add_row("created", run.created_at.isoformat(timespec="seconds"))
    table.add_row(
        "finished", run.finished_at.isoformat(timespec="seconds") if run.finished_at else "-"
    )
    table.add_row("rounds", str(len(rounds)))
    if run.heartbeat_at is not None:
        table.add_row("last heartbeat", run.heartbeat_at.isoformat(timespec="seconds"))
    table.add_row("uploaded bytes", str(sum(r.upload_bytes for r in rounds)))
    table.add_row("downloaded bytes", str(sum(r.download_bytes for r in rounds)))
    if rounds:
        for key, value in sorted(rounds[-1].metrics.items()):
            table.add_row(f"final {key}", _metric(key, value))
        rpt = run.config.get("cl.rounds-per-task")
        if run.config.get("cl.scenario", "none") != "none" and isinstance(rpt, int):
            cl = cl_summary(task_rows({r.round: r.metrics for r in rounds}), rpt)
            if cl:
                table.add_row("continual", format_cl(cl))
    if ckpt is not None and sha is not None:
        table.add_row("final checkpoint", f"round {ckpt[0]}, {len(ckpt[1])} bytes")
        table.add_row("checkpoint SHA-256", sha[1])
    else:
        table.add_row("final checkpoint", "none stored")
    unsigned = signature.startswith("UNSIGNED") or "NOT VERIFIED" in signature
    table.add_row("signature", f"[yellow]{signature}[/]" if unsigned else signature)
    console.print(table)
    trail = Table(title="audit trail (data and updates are never stored)")
    for col in ("round", "what", "detail"):
        trail.add_column(col, overflow="fold")
    for e in audit:
        # Reasons and ids come from the network: never let them act as rich markup.
        trail.add_row("-" if e.round is None else str(e.round), e.what, escape(e.detail))
    console.print(trail)


def _status_line(run: RunInfo) -> str:
    if run.stale:
        return (
            f"stale (stored as running; its process is gone); resume with "
            f"`leanfed simulate --resume {run.id}`"
        )
    if run.status == "interrupted":
        return f"interrupted; resume with `leanfed simulate --resume {run.id}`"
    return run.status


def _round_list(rounds: list[int], shown: int = 20) -> str:
    text = ", ".join(str(r) for r in rounds[:shown])
    return f"{len(rounds)}: {text}{' ...' if len(rounds) > shown else ''}"


@runs_app.command("delete")
def delete_run(
    run_id: RunIdArg,
    db: DbOption = None,
    yes: Annotated[bool, typer.Option("--yes", help="Delete without asking.")] = False,
) -> None:
    """Delete a run and all its rounds, checkpoints, masks and events."""
    with _open(db, read_only=False) as store:
        full_id = store.resolve_run_id(run_id)
        run = store.get_run(full_id)
        if not yes and not typer.confirm(
            f"delete run {full_id} ({run.name}, {run.display_status}, {run.num_rounds} rounds)?"
        ):
            _fail("not deleted (pass --yes to skip this question)")
        store.delete_run(full_id)
    Console(highlight=False).print(f"deleted run {full_id}")


@runs_app.command("upgrade")
def upgrade_store(db: DbOption = None) -> None:
    """Migrate an existing run store to this leanfed's schema (read commands never do)."""
    with _open(db, read_only=False) as store:
        revision = store.schema_revision
    Console(highlight=False).print(f"{store.url} is at schema revision {revision}")


def report(
    run_id: RunIdArg,
    out: Annotated[Path, typer.Option("--out", help="Directory for report.md and the PNGs.")],
    db: DbOption = None,
    baseline: Annotated[
        str | None, typer.Option("--baseline", help="Run id of a dense baseline to overlay.")
    ] = None,
) -> None:
    """Write report.md and PNG plots (accuracy, loss, bytes, layer densities) for a run."""
    # Imported here so `leanfed runs list` never pays for matplotlib.
    from simulations.report import write_report

    with _open(db) as store:
        full_id = _resolve(store, run_id)
        base_id = _resolve(store, baseline) if baseline else None
        path = write_report(store, full_id, out, baseline_run_id=base_id)
    Console(highlight=False).print(f"wrote {path}")


class ExportFormat(StrEnum):
    """Formats of `leanfed export`."""

    torchscript = "torchscript"
    onnx = "onnx"


def export(
    run_id: RunIdArg,
    out: Annotated[Path, typer.Option("--out", help="Directory for the model, mask and card.")],
    round: Annotated[
        int | None, typer.Option("--round", help="Round to export (default: the newest).", min=1)
    ] = None,
    fmt: Annotated[ExportFormat, typer.Option("--format")] = ExportFormat.torchscript,
    db: DbOption = None,
    signing_key: KeyOption = None,
) -> None:
    """Export the condensed global model, its mask and a model card from a run's checkpoint.

    The run's checkpoint signatures are checked first (same policy as resume); with a
    private signing key the exported folder is signed (SIGNATURE.json).
    """
    from server.export import export_model  # torch.jit / onnx only when exporting

    with _open(db) as store:
        full_id = _resolve(store, run_id)
        verifier = verifier_from(signing_key)
        check_export(store, full_id, verifier)
        res = export_model(store, full_id, out, round=round, fmt=fmt.value)
    signed = ""
    path = key_path(signing_key)
    if path is not None and is_private_key_file(path):
        signed = f"; signed {sign_export(out, load_signer(path)).name}"
    card = res.card
    Console(highlight=False).print(
        f"wrote {res.model_path} (round {card['round']}, accuracy {100 * card['accuracy']:.2f}%, "
        f"{card['params_condensed']:,} of {card['params_dense']:,} parameters), "
        f"{res.mask_path.name}, {res.card_path.name}{signed or '; unsigned (no private key)'}"
    )


def register(app: typer.Typer) -> None:
    """Add `runs list|show`, `report` and `export` to the leanfed CLI."""
    app.add_typer(runs_app, name="runs")
    app.command("report")(report)
    app.command("export")(export)
