"""Tuning sweep of the record-level DP arm on a VALIDATION split (never the test set).

``python -m simulations.dp_sweep --out FILE [--jobs N] [--only NAME,...] [--averages]``: every named
setting (``SETTINGS``: changes to ``bench_privacy_dp.session14_base``) at density 0.1, trained
on the training set less ``VALIDATION`` held-out examples and scored on them, at epsilon 8
(z calibrated as the bench does) and without DP. Rows are appended to FILE (JSON list) as
they finish, so an interrupted sweep keeps what it measured. The bench's defaults are the
setting picked here; only that setting's TEST accuracy is published (``leanfed bench
privacy``). ``--averages``: each row also scores every server-side averaging variant
(`simulations.average_replay`: the same run's iterates, ``aggregation.average`` replayed).
"""

from __future__ import annotations

import argparse
import json
import math
from concurrent.futures import ProcessPoolExecutor, as_completed
from functools import partial
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch

from simulations.average_replay import AVERAGE_VARIANTS, IterateLog, replay
from simulations.bench_privacy_dp import dp_arm_config, dp_row, session14_base
from simulations.grid import quiet_flower

__all__ = ["CHOSEN", "SETTINGS", "VALIDATION", "sweep_arms"]

# 10 % of MNIST-5k's 4,000 training examples (40 per digit); the sites share the other 3,600
VALIDATION = 400

# every site every round (session 15's pick), and on it session 16's ScatterNet + CNN head
_ALL_SITES: dict[str, Any] = {"fraction_train": 1.0, "min_train_nodes": 20}
_SCATTER_CNN: dict[str, Any] = {**_ALL_SITES, "model": "scatter-cnn", "dst_exclude": "fc.weight"}

# name -> (changes to the bench's record-level config, model options)
SETTINGS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "prev": ({}, {}),  # the published session-14 settings
    "all-sites": ({**_ALL_SITES}, {}),
    "all-sites-tanh": ({**_ALL_SITES}, {"activation": "tanh"}),
    "all-sites-tanh-h32": (
        {**_ALL_SITES},
        {"activation": "tanh", "hidden": 32},
    ),
    "all-sites-tanh-lr0.05": (
        {**_ALL_SITES, "local_lr": 0.05},
        {"activation": "tanh"},
    ),
    "all-sites-tanh-lr0.2": (
        {**_ALL_SITES, "local_lr": 0.2},
        {"activation": "tanh"},
    ),
    "all-sites-tanh-clip1": (
        {**_ALL_SITES, "privacy_clip": 1.0},
        {"activation": "tanh"},
    ),
    "all-sites-lr0.05": ({**_ALL_SITES, "local_lr": 0.05}, {}),
    "all-sites-lr0.2": ({**_ALL_SITES, "local_lr": 0.2}, {}),
    "all-sites-clip1": ({**_ALL_SITES, "privacy_clip": 1.0}, {}),
    # De et al. 2022: larger batches at the same epsilon (q = 64 / 180, z recalibrated)
    "all-sites-b64": ({**_ALL_SITES, "local_batch_size": 64}, {}),
    "all-sites-40x5": (
        {**_ALL_SITES, "num_server_rounds": 40, "local_steps": 5},
        {},
    ),
    # Tramer & Boneh 2021: a fixed ScatterNet (J = 2, tasks.scattering) + a small trainable
    # head; the head's kernels are the DST-masked ones (scatter-cnn: classifier dense, as the
    # CNN's); the same model in the DP and non-private arms
    "scatter-linear": (
        {
            **_ALL_SITES,
            "model": "scatter-linear",
            "dst_exclude": "",
        },
        {},
    ),
    "scatter-cnn": (
        {**_SCATTER_CNN},
        {},
    ),
    "scatter-linear-lr0.2": (
        {
            **_ALL_SITES,
            "model": "scatter-linear",
            "dst_exclude": "",
            "local_lr": 0.2,
        },
        {},
    ),
    "scatter-cnn-w16": (
        {**_SCATTER_CNN},
        {"width": 16},
    ),
    "scatter-cnn-relu": (
        {**_SCATTER_CNN},
        {"activation": "relu"},
    ),
    "scatter-cnn-b64": (
        {
            **_SCATTER_CNN,
            "local_batch_size": 64,
        },
        {},
    ),
    "scatter-cnn-clip1": (
        {
            **_SCATTER_CNN,
            "privacy_clip": 1.0,
        },
        {},
    ),
    "scatter-cnn-lr0.2": (
        {
            **_SCATTER_CNN,
            "local_lr": 0.2,
        },
        {},
    ),
    "scatter-cnn-40x5": (
        {
            **_SCATTER_CNN,
            "num_server_rounds": 40,
            "local_steps": 5,
        },
        {},
    ),
    # session 17: larger batches (De et al. 2022) with a larger step or more rounds, each at
    # epsilon 8 with z recalibrated (b64 x 200 steps: 3.345; b128: 6.467; b64 x 300: 4.042)
    "scatter-cnn-b64-lr0.2": (
        {**_SCATTER_CNN, "local_batch_size": 64, "local_lr": 0.2},
        {},
    ),
    "scatter-cnn-b128": (
        {**_SCATTER_CNN, "local_batch_size": 128},
        {},
    ),
    "scatter-cnn-b64-30r": (
        {**_SCATTER_CNN, "local_batch_size": 64, "num_server_rounds": 30},
        {},
    ),
    # session 17's pick: batch 128 and the served model the mean of the last 3 rounds'
    # (`aggregation.average`, post-processing); the variants were scored by --averages
    "scatter-cnn-b128-tail3": (
        {
            **_SCATTER_CNN,
            "local_batch_size": 128,
            "aggregation_average": "tail",
            "aggregation_average_rounds": 3,
        },
        {},
    ),
    # full-batch DP-GD at each site (q = 1: every example every step, no amplification by
    # sampling): 20 rounds x 2 steps = 40 steps at z = 4.03 is 0.022 C of noise per
    # coordinate per step (z C / B), vs 0.057 C for 200 steps at q = 32 / 180 (z = 1.82);
    # fewer, cleaner steps for a head on fixed features (Tramer & Boneh 2021 used large
    # batches). Batch 200 >= every site's examples (180 on the validation split, 200 in the
    # bench), so q = 1 in both.
    "scatter-cnn-fb-2x20": (
        {
            **_SCATTER_CNN,
            "local_batch_size": 200,
            "local_steps": 2,
        },
        {},
    ),
    "scatter-cnn-fb-2x20-lr0.4": (
        {
            **_SCATTER_CNN,
            "local_batch_size": 200,
            "local_steps": 2,
            "local_lr": 0.4,
        },
        {},
    ),
}


# The setting the bench runs (``bench_privacy_dp.RECORD_TUNED`` / ``RECORD_MODEL``; tested).
# Sessions 15-16: the best epsilon-8 validation accuracy of one seed, a tie within one
# standard error (about 2 points on 400 images) going to the cheaper setting: "all-sites"
# (81.0 %), then the ScatterNet + CNN head "scatter-cnn" (90.75 %; batch 64 91.5 %, a tie).
# Session 17 (README, results/privacy/dp_sweep_average.json): the three leaders (batch 32,
# 64, 128) rerun at seeds 1 and 2 (each seed its own 400-image split), every averaging
# variant scored (`simulations.average_replay`); the pick is the (setting, average) with
# the best epsilon-8 validation accuracy MEAN over the 3 seeds: batch 128 + tail-3 average,
# 93.17 % (no DP 98.17 %); batch 64 + EMA 0.5 93.00 %, batch 32 + EMA 0.5 92.33 %, within
# noise of it (stated in the README). Batch 128 costs 4x batch 32's DP-SGD compute per step,
# the same bytes.
CHOSEN = "scatter-cnn-b128-tail3"


def sweep_arms(
    names: list[str], seed: int = 0, epsilons: tuple[float, ...] = (8.0, math.inf)
) -> list[tuple[Any, ...]]:
    """(config, kind, epsilon, name) of every setting at ``epsilons`` (inf: without DP)."""
    arms = []
    for name in names:
        changes, model_options = SETTINGS[name]
        options = tuple(sorted(("model", k, v) for k, v in model_options.items()))
        base = session14_base(seed).replace(
            validation_size=VALIDATION, plugin_options=options, **changes
        )
        for eps in epsilons:
            arms.append((dp_arm_config(base, "record", eps, 0.1), "record", eps, name))
    return arms


def _init() -> None:
    torch.set_num_threads(1)  # as bench_jobs: one thread per arm, rows independent of cores
    quiet_flower()


def _row(cfg: Any, kind: str, eps: float, name: str, averages: bool = False) -> dict[str, Any]:
    log = IterateLog() if averages else None
    row = dp_row(cfg, kind, eps, on_round=log)
    if log is not None:
        row["averaged"] = replay(cfg, log, AVERAGE_VARIANTS)
    row |= {"setting": name, "validation_size": cfg.validation_size, "evaluated_on": "validation"}
    row["config"] = {k: v for k, v in cfg.to_run_config().items() if not k.startswith("secure")}
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--only", default=",".join(SETTINGS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eps", default="8,inf", help="comma-separated epsilons (inf: no DP)")
    ap.add_argument("--averages", action="store_true", help="also score averaging variants")
    args = ap.parse_args()
    names = [n for n in args.only.split(",") if n]
    unknown = sorted(set(names) - set(SETTINGS))
    if unknown:
        raise SystemExit(f"unknown setting(s) {unknown}; known: {sorted(SETTINGS)}")
    epsilons = tuple(float(e) for e in args.eps.split(","))
    arms = sweep_arms(names, args.seed, epsilons)
    rows = []
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    with ProcessPoolExecutor(
        max(1, min(args.jobs, len(arms))), mp_context=get_context("spawn"), initializer=_init
    ) as pool:
        row_fn = partial(_row, averages=args.averages)
        for f in as_completed([pool.submit(row_fn, *a) for a in arms]):
            rows.append(f.result())  # appended as each arm ends: a stopped sweep keeps them
            old = json.loads(args.out.read_text()) if args.out.exists() else []
            args.out.write_text(json.dumps([*old, rows[-1]], indent=1) + "\n")
            print(f"done: {rows[-1]['setting']} eps={rows[-1]['epsilon']}", flush=True)
    for r in rows:
        eps = "inf" if r["epsilon"] is None else f"{r['epsilon']:g}"
        print(f"{r['setting']:28s} eps={eps:4s} val_acc={r['final_accuracy']:.3f}")
        for v, a in r.get("averaged", {}).items():
            print(f"  +{v:10s} val_acc={a['final_accuracy']:.4f}")


if __name__ == "__main__":
    main()
