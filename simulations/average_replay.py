"""Scores every server-side averaging variant from ONE run's iterates (the DP tuning sweep's).

``aggregation.average`` changes only the served model: the clients train from the latest
iterate whatever the average (`strategies.aggregation.averaging`, tested), so the iterates and
consensus masks of a run without it are exactly those of a run with it. `IterateLog` keeps
them (an ``on_round`` callback); `replay` folds them into each variant's `ModelAverage`, built
by the runner's own `server.runner.model_average`, and evaluates the served model each round,
as ``evaluate_fn`` would: one training run scores all variants.
"""

from __future__ import annotations

from typing import Any

import torch
from flwr.app import ArrayRecord

from server.runner import RoundRecord, _dataset, make_model, model_average, test_tensors
from tasks.config import LeanfedConfig
from tasks.evaluation import evaluate
from tasks.plugins import run_dataset

__all__ = ["AVERAGE_VARIANTS", "IterateLog", "replay"]

# variant name -> run-config changes; an EMA with decay b weighs about the last 1 / (1 - b)
# rounds, the tails the last k of the 20 rounds
AVERAGE_VARIANTS: dict[str, dict[str, Any]] = {
    "none": {"aggregation_average": "none"},
    "ema0.5": {"aggregation_average": "ema", "aggregation_average_decay": 0.5},
    "ema0.8": {"aggregation_average": "ema", "aggregation_average_decay": 0.8},
    "ema0.9": {"aggregation_average": "ema", "aggregation_average_decay": 0.9},
    "tail3": {"aggregation_average": "tail", "aggregation_average_rounds": 3},
    "tail5": {"aggregation_average": "tail", "aggregation_average_rounds": 5},
    "tail10": {"aggregation_average": "tail", "aggregation_average_rounds": 10},
}


class IterateLog:
    """``on_round`` callback of a run WITHOUT averaging: each round's global model and mask."""

    def __init__(self) -> None:
        self.rounds: list[tuple[int, dict[str, torch.Tensor], dict[str, torch.Tensor] | None]] = []

    def __call__(self, rec: RoundRecord, strategy: object, arrays: ArrayRecord) -> None:
        mask = getattr(strategy, "mask", None)
        state = {k: v.clone() for k, v in arrays.to_torch_state_dict().items()}
        kept = None if mask is None else {k: m.clone() for k, m in mask.items()}
        self.rounds.append((rec.round, state, kept))


def replay(cfg: LeanfedConfig, log: IterateLog, variants: dict[str, dict[str, Any]]) -> dict:
    """{variant: {"final_accuracy", "accuracy_per_round"}} on the run's held-out set."""
    if cfg.aggregation_average != "none":
        raise ValueError("replay needs the iterates of a run without aggregation.average")
    ds = run_dataset(cfg, _dataset)
    x, y = test_tensors(ds)
    model = make_model(cfg, ds)
    out: dict[str, dict[str, Any]] = {}
    for name, changes in variants.items():
        average = model_average(cfg.replace(**changes))
        accs = []
        for server_round, state, mask in log.rounds:
            served = state
            if average is not None:
                average.update(state, server_round)
                served = average.value(mask)
            model.load_state_dict(served)
            accs.append(evaluate(model, x, y)[1])
        out[name] = {"final_accuracy": accs[-1], "accuracy_per_round": accs}
    return out
