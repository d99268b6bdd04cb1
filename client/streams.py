"""Which stream a continual client trains on: a site's own FileStream or its scenario share.

Scenario streams are built by ``tasks.scenarios.make_scenario`` (the default; another
factory can be installed with :func:`register_scenario_builder`); a deployed client
reads its own ``FileStream`` from node-config "stream-dir".
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Protocol

from client.data import Options, shared_dataset
from tasks.config import LeanfedConfig
from tasks.plugins import frozen_options
from tasks.stream import ClientStream, FileStream, StreamError


class ScenarioLike(Protocol):
    """What the client reads from ``tasks.scenarios.Scenario``."""

    @property
    def num_classes(self) -> int: ...
    @property
    def input_shape(self) -> tuple[int, ...]: ...
    def stream(self, client: int) -> ClientStream: ...


# make_scenario(name, num_clients, seed, *, rounds_per_task, async_max_delay, dataset=...)
ScenarioBuilder = Callable[..., ScenarioLike]
_builder: list[ScenarioBuilder] = []


def register_scenario_builder(builder: ScenarioBuilder) -> None:
    """Install the scenario factory (``tasks.scenarios.make_scenario``)."""
    _builder[:] = [builder]
    _scenario.cache_clear()


@lru_cache(maxsize=4)
def _scenario(
    name: str,
    num_clients: int,
    seed: int,
    rounds_per_task: int,
    delay: int,
    dataset: str,
    data_options: Options = (),
    options: Options = (),
) -> ScenarioLike:
    if not _builder:
        from tasks.scenarios import make_scenario  # default: the shipped scenarios

        _builder.append(make_scenario)
    return _builder[0](
        name,
        num_clients,
        seed,
        rounds_per_task=rounds_per_task,
        async_max_delay=delay,
        data=shared_dataset(dataset, seed, data_options),
        **dict(options),
    )


@dataclass(frozen=True)
class StreamData:
    """A node's stream and the task shape its model is built for."""

    stream: ClientStream
    num_classes: int
    input_shape: tuple[int, ...]


def sync_boundaries(cfg: LeanfedConfig, length: int) -> list[int]:
    """Round in which experience t starts: 1 + t * cl.rounds-per-task."""
    return [1 + t * cfg.cl_rounds_per_task for t in range(length)]


def client_stream(cfg: LeanfedConfig, node_config: dict[str, Any]) -> StreamData:
    """This node's stream: ``FileStream`` from node-config "stream-dir", else its scenario share.

    A deployed node may pass "stream-boundaries" ("1,6,11": the round each experience
    starts) and "num-classes"; by default experiences start every cl.rounds-per-task
    rounds and the class count is that of the run's dataset.
    """
    if "stream-dir" in node_config:
        probe = FileStream(str(node_config["stream-dir"]))
        if "stream-boundaries" in node_config:
            raw = str(node_config["stream-boundaries"])
            try:
                bounds = [int(b) for b in raw.split(",") if b.strip()]
            except ValueError as err:
                raise StreamError(f"stream-boundaries {raw!r}: expected '1,6,11'") from err
        else:
            bounds = sync_boundaries(cfg, len(probe))
        stream = FileStream(str(node_config["stream-dir"]), boundaries=bounds)
        first = stream.experience(0)
        if "num-classes" in node_config:
            num_classes = int(node_config["num-classes"])
        else:
            ds = shared_dataset(cfg.dataset, cfg.seed, frozen_options(cfg, "dataset"))
            num_classes = int(ds.num_classes)
        return StreamData(stream, num_classes, tuple(int(s) for s in first.x.shape[1:]))
    if "partition-id" not in node_config:
        raise ValueError("node_config needs 'partition-id' (simulation) or 'stream-dir' (deployed)")
    pid = int(node_config["partition-id"])
    n = int(node_config.get("num-partitions", cfg.num_partitions))
    if not 0 <= pid < n:
        raise ValueError(f"partition-id {pid} out of range for {n} partitions")
    sc = _scenario(
        cfg.cl_scenario,
        n,
        cfg.seed,
        cfg.cl_rounds_per_task,
        cfg.cl_async_max_delay,
        cfg.dataset,
        frozen_options(cfg, "dataset"),
        frozen_options(cfg, "cl"),
    )
    return StreamData(sc.stream(pid), int(sc.num_classes), tuple(sc.input_shape))


# -- state in context.state ------------------------------------------------------------
