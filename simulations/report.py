"""Write a run's report: PNG plots (accuracy, loss, bytes, layer densities) and report.md."""

from __future__ import annotations

import itertools
from collections import Counter
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from server.store import RoundInfo, RunInfo, RunStore
from simulations.continual_summary import accuracy_matrix, task_rows

MB = 1_000_000.0


def _cumulative(values: list[int]) -> list[float]:
    return [v / MB for v in itertools.accumulate(values)]


def _rounds_axis(ax: Axes) -> None:
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds are whole numbers
    ax.grid(alpha=0.3)


def settings(config: dict[str, object]) -> dict[str, str]:
    """What a run was: dataset, model, strategy (with its rule) and DST rule at its density."""

    def get(key: str, default: str = "-") -> str:
        return str(config.get(key, default))

    strategy = get("strategy")
    if strategy == "sparse":
        strategy = f"sparse/{get('aggregation.rule', 'mean')}"
    rule = get("dst.rule")
    density = "1" if rule == "dense" else get("dst.density")
    return {
        "dataset": get("dataset"),
        "model": get("model"),
        "strategy": strategy,
        "DST rule": rule,
        "density": density,
    }


def _title(fig: Figure, run: RunInfo) -> None:
    """The run's name and key settings on every plot, so a PNG makes sense on its own."""
    st = settings(run.config)
    fig.suptitle(
        f"{run.name or run.id[:12]}: {st['dataset']}, model {st['model']}, {st['strategy']}, "
        f"DST {st['DST rule']} at density {st['density']}",
        fontsize="small",
    )


def _save(fig: Figure, path: Path) -> Path:
    # Figure() without pyplot: no global state, no GUI backend; savefig picks Agg for PNG.
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def _plot_accuracy_loss(run: RunInfo, rounds: list[RoundInfo], path: Path) -> Path | None:
    acc = [(r.round, r.accuracy) for r in rounds if r.accuracy is not None]
    loss = [(r.round, r.train_loss) for r in rounds if r.train_loss is not None]
    test_loss = [(r.round, r.metrics["loss"]) for r in rounds if "loss" in r.metrics]
    if not acc and not loss and not test_loss:
        return None
    fig = Figure(figsize=(9, 3.8))
    ax_acc, ax_loss = fig.subplots(1, 2)
    if acc:
        ax_acc.plot(*zip(*acc, strict=True), marker="o")
    dataset = settings(run.config)["dataset"]
    ax_acc.set(
        title=f"global model on the held-out test set of {dataset}",
        xlabel="round",
        ylabel="test accuracy",
    )
    if test_loss:
        ax_loss.plot(*zip(*test_loss, strict=True), marker="o", label="test loss (held-out set)")
    if loss:
        ax_loss.plot(
            *zip(*loss, strict=True),
            marker="s",
            linestyle="--",
            label="train loss (clients' local steps, example-weighted)",
        )
    ax_loss.set(title="loss", xlabel="round", ylabel="cross-entropy")
    ax_loss.legend(fontsize="x-small")
    for ax in (ax_acc, ax_loss):
        _rounds_axis(ax)
    _title(fig, run)
    return _save(fig, path)


def _plot_bytes(run: RunInfo, rounds: list[RoundInfo], path: Path) -> Path:
    xs = [r.round for r in rounds]
    fig = Figure(figsize=(6, 3.5))
    ax = fig.subplots()
    ax.plot(xs, _cumulative([r.upload_bytes for r in rounds]), marker="o", label="upload")
    ax.plot(xs, _cumulative([r.download_bytes for r in rounds]), marker="s", label="download")
    ax.set(title="cumulative bytes on the wire", xlabel="round", ylabel="MB")
    _rounds_axis(ax)
    ax.legend()
    _title(fig, run)
    return _save(fig, path)


def _plot_layer_densities(
    run: RunInfo, series: list[tuple[int, dict[str, float]]], path: Path
) -> Path | None:
    layers = sorted({name for _, d in series for name in d})
    if not layers:
        return None
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    for name in layers:
        pts = [(r, d[name]) for r, d in series if name in d]
        ax.plot(*zip(*pts, strict=True), marker=".", label=name)
    target = run.config.get("dst.density")
    if isinstance(target, int | float) and run.config.get("dst.rule") != "dense":
        ax.axhline(float(target), color="black", linestyle=":", label=f"target {target}")
    ax.set(title="consensus-mask density per layer", xlabel="round", ylabel="density")
    ax.set_ylim(0, 1.05)
    _rounds_axis(ax)
    _title(fig, run)
    if len(layers) <= 12:
        ax.legend(fontsize="x-small")
    return _save(fig, path)


def _acc_vs_upload(rounds: list[RoundInfo]) -> tuple[list[float], list[float]]:
    xs: list[float] = []
    ys: list[float] = []
    for up, r in zip(_cumulative([r.upload_bytes for r in rounds]), rounds, strict=True):
        if r.accuracy is not None:
            xs.append(up)
            ys.append(r.accuracy)
    return xs, ys


def _plot_acc_vs_upload(
    run: RunInfo,
    rounds: list[RoundInfo],
    path: Path,
    baseline: tuple[RunInfo, list[RoundInfo]] | None,
) -> Path | None:
    xs, ys = _acc_vs_upload(rounds)
    if not xs:
        return None
    fig = Figure(figsize=(6, 3.5))
    ax = fig.subplots()
    ax.plot(xs, ys, marker="o", label="this run", zorder=3)
    if baseline is not None:
        bx, by = _acc_vs_upload(baseline[1])
        if bx:  # hollow markers, dashed and translucent: overlapping arms stay visible
            ax.plot(
                bx,
                by,
                marker="s",
                markerfacecolor="none",
                linestyle="--",
                alpha=0.8,
                label=f"baseline {baseline[0].name}",
                zorder=2,
            )
    ax.set(
        title="test accuracy vs uploaded MB",
        xlabel="cumulative upload (MB)",
        ylabel="test accuracy",
    )
    ax.grid(alpha=0.3)
    ax.legend()
    _title(fig, run)
    return _save(fig, path)


def _plot_accuracy_matrix(run: RunInfo, rounds: list[RoundInfo], path: Path) -> Path | None:
    """Heat map of R[i, j]: accuracy on task j's test set after experience i."""
    rpt = run.config.get("cl.rounds-per-task")
    if not isinstance(rpt, int):
        return None
    found = accuracy_matrix(task_rows({r.round: r.metrics for r in rounds}), rpt)
    if found is None:
        return None
    r = found[0].r
    fig = Figure(figsize=(1.2 * r.shape[1] + 2.5, 1.0 * r.shape[0] + 2.0))
    ax = fig.subplots()
    im = ax.imshow(r, vmin=0.0, vmax=1.0, cmap="viridis")
    for (i, j), v in np.ndenumerate(r):
        if not np.isnan(v):
            ax.text(
                j,
                i,
                f"{v:.2f}",
                ha="center",
                va="center",
                color="white" if v < 0.6 else "black",
                fontsize="small",
            )
    ax.set(
        title="accuracy matrix R[i, j] (test sets)",
        xlabel="evaluated on task j",
        ylabel="after experience i",
    )
    ax.set_xticks(range(r.shape[1]))
    ax.set_yticks(range(r.shape[0]))
    fig.colorbar(im, ax=ax, fraction=0.046)
    _title(fig, run)
    return _save(fig, path)


def _fmt(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _cell(value: object) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def find_baseline(store: RunStore, run_id: str) -> str | None:
    """The id of a stored run whose config says `baseline_of = run_id` (newest), else None."""
    for other in store.list_runs():
        if other.id != run_id and other.config.get("baseline_of") == run_id:
            return other.id
    return None


def _markdown(
    store: RunStore,
    run: RunInfo,
    rounds: list[RoundInfo],
    images: dict[str, Path | None],
    baseline: tuple[RunInfo, list[RoundInfo]] | None,
) -> str:
    up = sum(r.upload_bytes for r in rounds)
    down = sum(r.download_bytes for r in rounds)
    ckpt = store.checkpoint_sha256(run.id)
    lines = [
        f"# leanfed run report: {run.name}",
        "",
        f"- run id: `{run.id}`",
        f"- status: {run.display_status}" + (f" ({run.reason})" if run.reason else ""),
        f"- seed: {run.seed}",
        f"- code version: {run.code_version}",
        f"- created: {run.created_at.isoformat(timespec='seconds')}",
        f"- finished: {run.finished_at.isoformat(timespec='seconds') if run.finished_at else '-'}",
        f"- rounds stored: {len(rounds)}",
        f"- final accuracy: {_fmt(run.final_accuracy)}",
        f"- bytes: {up / MB:.3f} MB uploaded, {down / MB:.3f} MB downloaded",
        "- final global checkpoint: "
        + (f"round {ckpt[0]}, SHA-256 `{ckpt[1]}`" if ckpt else "none stored"),
    ]
    if baseline is not None:
        b_up = sum(r.upload_bytes for r in baseline[1])
        lines.append(
            f"- baseline: {baseline[0].name} (`{baseline[0].id}`), final accuracy "
            f"{_fmt(baseline[0].final_accuracy)}, {b_up / MB:.3f} MB uploaded"
        )
    lines += ["", "## Config", "", "| key | value |", "|---|---|"]
    lines += [f"| {k} | {_cell(v)} |" for k, v in sorted(run.config.items())]
    lines += ["", "## Plots", ""]
    titles = {
        "accuracy_loss": "Accuracy and training loss per round",
        "bytes": "Cumulative bytes each way",
        "layer_density": "Consensus-mask density per layer",
        "accuracy_vs_upload": "Accuracy vs uploaded MB",
        "accuracy_matrix": "Continual accuracy matrix",
    }
    for key, title in titles.items():
        img = images.get(key)
        if img is None:
            lines += [f"### {title}", "", "_no data stored for this plot_", ""]
        else:
            lines += [f"### {title}", "", f"![{title}]({img.name})", ""]
    lines += [
        "## Rounds",
        "",
        "| round | accuracy | train loss | density | upload (B) | download (B) | wall (s) |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r.round} | {_fmt(r.accuracy)} | {_fmt(r.train_loss)} | {_fmt(r.density)} "
        f"| {r.upload_bytes} | {r.download_bytes} | {r.wall_s:.2f} |"
        for r in rounds
    ]
    private = [r for r in rounds if "dp_epsilon" in r.metrics]
    if private:  # differential privacy: the accountant's epsilon(delta) after each round
        delta = private[-1].metrics.get("dp_delta", float("nan"))
        lines += ["", "## Privacy", "", f"epsilon(delta = {delta:g}) after each round:", ""]
        lines += ["| round | epsilon |", "|---:|---:|"]
        lines += [f"| {r.round} | {r.metrics['dp_epsilon']:.3f} |" for r in private]
    clients = store.get_client_results(run.id)
    rejected = [c for c in clients if not c.accepted]
    lines += ["", "## Clients", "", f"- replies stored: {len(clients)}, rejected: {len(rejected)}"]
    for reason, n in Counter(c.reason or "(no reason)" for c in rejected).most_common():
        lines.append(f"  - {n} x {reason}")
    events = store.get_events(run.id)
    lines += ["", "## Events", ""]
    if events:
        lines += [f"- {kind}: {n}" for kind, n in Counter(e.kind for e in events).most_common()]
    else:
        lines.append("- none")
    return "\n".join(lines) + "\n"


def write_report(
    store: RunStore, run_id: str, out_dir: Path | str, *, baseline_run_id: str | None = None
) -> Path:
    """Write PNG plots and report.md for one stored run into `out_dir`; return report.md's path.

    `baseline_run_id` (e.g. the dense run of the same dataset) is drawn beside the run on the
    accuracy-vs-uploaded-MB plot; when None, a run whose config has `baseline_of = run_id` is
    used if one is stored. Works on any store backend; raises RunNotFoundError.
    """
    run = store.get_run(run_id)
    baseline_run_id = baseline_run_id or find_baseline(store, run_id)
    rounds = store.get_rounds(run_id)
    baseline = None
    if baseline_run_id is not None:
        baseline = (store.get_run(baseline_run_id), store.get_rounds(baseline_run_id))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    images: dict[str, Path | None] = {
        "accuracy_loss": _plot_accuracy_loss(run, rounds, out / "accuracy_loss.png"),
        "bytes": _plot_bytes(run, rounds, out / "bytes.png") if rounds else None,
        "layer_density": _plot_layer_densities(
            run, store.get_layer_densities(run_id), out / "layer_density.png"
        ),
        "accuracy_vs_upload": _plot_acc_vs_upload(
            run, rounds, out / "accuracy_vs_upload.png", baseline
        ),
        "accuracy_matrix": _plot_accuracy_matrix(run, rounds, out / "accuracy_matrix.png"),
    }
    report = out / "report.md"
    report.write_text(_markdown(store, run, rounds, images, baseline), encoding="utf-8")
    return report
