"""Builds the strategy from the validated config and runs it on any Grid, recording each round.

The round loop is Flower's own ``Strategy.start``; leanfed only supplies the strategy,
the initial arrays and an ``evaluate_fn`` that evaluates the global model on the held-out
set and hands each finished round to a callback (the run store writer). Resuming wraps
the strategy in :class:`RoundOffset` so rounds keep their absolute numbers. With
``aggregation.average`` the strategy is wrapped in `strategies.aggregation.averaging`'s
``AveragedStrategy``: every evaluation, the returned model and the checkpoints hold the
averaged model, while the clients train from the latest iterate (a run with it cannot resume).
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from server.strategy_factory import build_strategy, fit_strategy, sparse_init
from strategies.aggregation.averaging import AveragedStrategy, ModelAverage
from strategies.aggregation.counting import ByteCountingFedAvg
from strategies.aggregation.strategy import SparseFedAvg
from tasks.config import ConfigError, LeanfedConfig
from tasks.datasets import Dataset, load_dataset
from tasks.evaluation import evaluate
from tasks.partition import make_partition
from tasks.plugins import run_dataset, run_model
from tasks.scenarios import make_scenario


@dataclass
class RoundRecord:
    """What the server knows about one finished round."""

    round: int
    accuracy: float
    loss: float
    train_loss: float | None
    upload_bytes: int
    download_bytes: int
    wall_s: float
    density: float
    num_rejected: int = 0
    num_accepted: int | None = None  # train replies aggregation accepted (None: not reported)
    degraded: bool = False  # fewer accepted replies than the config's min-accepted-replies
    metrics: dict[str, float] = field(default_factory=dict)
    # Continual runs: accuracy on each task's test set (one accuracy-matrix row per round).
    task_accuracies: list[float] = field(default_factory=list)


@dataclass
class RunSummary:
    """Per-round history of one federated run."""

    config: LeanfedConfig
    initial_accuracy: float = 0.0
    initial_task_accuracies: list[float] = field(default_factory=list)  # b: the init model
    rounds: list[RoundRecord] = field(default_factory=list)
    final_state: dict[str, torch.Tensor] | None = None

    @property
    def final_accuracy(self) -> float:
        return self.rounds[-1].accuracy if self.rounds else self.initial_accuracy


# (record of the finished round, the strategy, the new global arrays) -> None
RoundCallback = Callable[[RoundRecord, Strategy, ArrayRecord], None]


@lru_cache(maxsize=4)
def _dataset(name: str, seed: int, options: tuple[tuple[str, object], ...] = ()) -> Dataset:
    # Parsed once per server process: a benchmark runs several methods on one dataset.
    return load_dataset(name, seed=seed, options=dict(options))


def scenario_task_tests(cfg: LeanfedConfig, ds: Dataset) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One held-out (x, y) per task of the run's continual scenario: the accuracy-matrix columns."""
    scenario = make_scenario(
        cfg.cl_scenario,
        cfg.num_partitions,
        cfg.seed,
        rounds_per_task=cfg.cl_rounds_per_task,
        data=ds,
        **cfg.options("cl"),  # type: ignore[arg-type]
    )
    return [(e.x, e.y) for e in (scenario.test_set(t) for t in range(scenario.num_tasks))]


def test_tensors(ds: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.as_tensor(ds.x_test, dtype=torch.float32)
    return x, torch.as_tensor(ds.y_test, dtype=torch.int64)


def make_model(cfg: LeanfedConfig, ds: Dataset) -> torch.nn.Module:
    return run_model(cfg, tuple(ds.input_shape), ds.num_classes)


def known_partition_sizes(grid: Grid, cfg: LeanfedConfig, ds: Dataset) -> dict[int, int]:
    """node_id -> training examples, where the server knows which partition a node holds.

    Only for a simulated, non-continual run on a grid that says (``partition_of``, as
    simulations.grid.InProcessGrid does): then a node trains on exactly its partition.
    """
    partition_of = getattr(grid, "partition_of", None)
    if cfg.cl_scenario != "none" or not callable(partition_of):
        return {}
    nodes = list(grid.get_node_ids())
    part = make_partition(
        cfg.partition_scheme,
        ds.y_train,
        len(nodes),
        cfg.seed,
        cfg.partition_alpha,
        cfg.partition_shards,
        cfg.partition_sample_size,
    )
    return {node: len(part.indices[int(partition_of(node))]) for node in nodes}


class RoundOffset(Strategy):
    """Delegates every hook with ``server_round + offset``: a resumed run keeps round numbers."""

    def __init__(self, inner: Strategy, offset: int) -> None:
        self.inner, self.offset = inner, offset

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.inner.configure_train(server_round + self.offset, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return self.inner.aggregate_train(server_round + self.offset, replies)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.inner.configure_evaluate(server_round + self.offset, arrays, config, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        return self.inner.aggregate_evaluate(server_round + self.offset, replies)

    def summary(self) -> None:
        self.inner.summary()


def check_runnable(cfg: LeanfedConfig) -> None:
    """Everything a run needs, checked before a run record exists: the dataset loads, the
    model builds for it, the merge rule imports and the strategy accepts its arguments.

    Raises the one-line errors of the registries (DatasetError, ModelError, ConfigError).
    """
    ds = run_dataset(cfg, _dataset)
    make_model(cfg, ds)
    try:
        build_strategy(cfg)
    except (TypeError, ValueError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"the strategy refuses this config: {exc}") from exc


def seed_round_rngs(seed: int, server_round: int) -> None:
    """Seed the process RNGs a round uses, from (seed, round) alone.

    Flower samples nodes with ``random``; dropout in an in-process ClientApp draws from the
    global torch RNG. Deriving both from (seed, round) before every round, instead of saving
    their state in the checkpoint, makes the checkpoint bytes (and SHA-256) of two identical
    runs equal, and a resumed run re-derives exactly the state an uninterrupted one had.
    """
    digest = hashlib.sha256(f"leanfed-round-rng/{seed}/{server_round}".encode()).digest()
    value = int.from_bytes(digest[:8], "big") & ((1 << 63) - 1)
    random.seed(value)
    torch.manual_seed(value)


def _round_bytes(strategy: Strategy, server_round: int) -> tuple[int, int]:
    log = getattr(strategy, "bytes_log", {}).get(server_round, {})
    return int(log.get("upload", 0)), int(log.get("download", 0))


def run_federated(
    grid: Grid,
    cfg: LeanfedConfig,
    *,
    on_round: RoundCallback | None = None,
    strategy: SparseFedAvg | ByteCountingFedAvg | None = None,
    initial_state: dict[str, torch.Tensor] | None = None,
    start_round: int = 1,
    timeout: float = 3600.0,
    task_tests: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> RunSummary:
    """Run rounds ``start_round..cfg.num_server_rounds`` of the configured strategy on ``grid``.

    ``strategy`` and ``initial_state`` let a resumed run continue from a checkpoint. Before
    every round the process RNGs are re-seeded from (seed, round): see seed_round_rngs.
    ``task_tests`` (continual runs): one (x, y) test set per task; every evaluation then
    also fills ``task_accuracies``, the accuracy-matrix row of that round.
    """
    ds = run_dataset(cfg, _dataset)
    x_test, y_test = test_tensors(ds)
    model = make_model(cfg, ds)
    if task_tests is None and cfg.cl_scenario != "none":
        task_tests = scenario_task_tests(cfg, ds)
    if initial_state is not None:
        model.load_state_dict(initial_state)
    if strategy is None:
        strategy = build_strategy(cfg)
        if isinstance(strategy, SparseFedAvg) and strategy.density < 1.0:
            strategy.mask = sparse_init(model, cfg)
    fit_strategy(strategy, model, cfg)
    sizes = known_partition_sizes(grid, cfg, ds)
    if sizes:  # "num-examples" may not exceed what the node holds
        strategy.limits = dataclasses.replace(strategy.limits, partition_sizes=sizes)
    offset = start_round - 1
    summary = RunSummary(config=cfg)
    clock = {"t": time.perf_counter()}

    def evaluate_fn(rel_round: int, arrays: ArrayRecord) -> MetricRecord:
        server_round = rel_round + offset
        wall = time.perf_counter() - clock["t"]
        model.load_state_dict(arrays.to_torch_state_dict())
        loss, acc = evaluate(model, x_test, y_test)
        task_accs = [evaluate(model, tx, ty)[1] for tx, ty in (task_tests or ())]
        if rel_round == 0:
            summary.initial_accuracy = acc
            summary.initial_task_accuracies = task_accs
        else:
            up, down = _round_bytes(strategy, server_round)
            agg = getattr(strategy, "last_train_metrics", {}) or {}
            accepted = _maybe_int(agg.get("num_accepted"))
            rec = RoundRecord(
                round=server_round,
                accuracy=acc,
                loss=loss,
                train_loss=_maybe_float(agg.get("train_loss")),
                upload_bytes=up,
                download_bytes=down,
                wall_s=wall,
                density=float(agg.get("density", 1.0)),
                num_rejected=int(agg.get("num_rejected", 0)),
                num_accepted=accepted,
                degraded=accepted is not None and accepted < cfg.min_accepted_replies,
                metrics={k: float(v) for k, v in agg.items() if isinstance(v, int | float)},
                task_accuracies=task_accs,
            )
            summary.rounds.append(rec)
            if on_round is not None:
                on_round(rec, strategy, arrays)
        seed_round_rngs(cfg.seed, server_round)  # after the round's checkpoint, before the next
        clock["t"] = time.perf_counter()  # the next round's wall time excludes evaluation
        return MetricRecord({"accuracy": acc, "loss": loss})

    initial = ArrayRecord({k: v.detach() for k, v in model.state_dict().items()})
    runner: Strategy = strategy if offset == 0 else RoundOffset(strategy, offset)
    average = model_average(cfg)
    if average is not None:
        if offset:
            raise ConfigError(NO_RESUME)
        runner = AveragedStrategy(runner, average, lambda: getattr(strategy, "mask", None))
    # A grid that streams replies (the embedded engine) lets the strategy screen each one
    # while later clients still run (strategies.aggregation.early); same verdicts.
    listeners = getattr(grid, "reply_listeners", None)
    observe = getattr(strategy, "observe_reply", None)
    if isinstance(listeners, list) and observe is not None:
        listeners.append(observe)
    try:
        result = runner.start(
            grid=grid,
            initial_arrays=initial,
            num_rounds=cfg.num_server_rounds - offset,
            timeout=timeout,
            # "proximal-mu": FedProx's client term, under the key Flower's FedProx sends.
            train_config=ConfigRecord({"seed": cfg.seed, "proximal-mu": cfg.local_proximal_mu}),
            evaluate_config=ConfigRecord({"seed": cfg.seed}),
            evaluate_fn=evaluate_fn,
        )
    finally:
        if isinstance(listeners, list) and observe in listeners:
            listeners.remove(observe)
    summary.final_state = dict(result.arrays.to_torch_state_dict()) if result.arrays else None
    return summary


NO_RESUME = (
    "a run with aggregation.average cannot resume: its checkpoints hold the averaged model, "
    "not the iterate the clients train from"
)


def model_average(cfg: LeanfedConfig) -> ModelAverage | None:
    """The run's server-side model average, or None (``aggregation.average = "none"``).

    ``tail``: the uniform mean of the last ``aggregation.average-rounds`` rounds' models.
    """
    if cfg.aggregation_average == "none":
        return None
    start = max(1, cfg.num_server_rounds - cfg.aggregation_average_rounds + 1)
    return ModelAverage(cfg.aggregation_average, cfg.aggregation_average_decay, start)


def _maybe_int(v: object) -> int | None:
    return int(v) if isinstance(v, int | float) and not isinstance(v, bool) else None


def _maybe_float(v: object) -> float | None:
    return float(v) if isinstance(v, int | float) else None
