"""Resolves a node's local training data: its simulated partition, or its own file when deployed."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from tasks.config import LeanfedConfig
from tasks.datasets import Dataset, hold_out_validation, load_dataset
from tasks.partition import make_partition
from tasks.plugins import frozen_options, site_options


@dataclass(frozen=True)
class LocalData:
    """One node's training tensors and the task shape."""

    x: torch.Tensor  # [N, *input_shape] float32
    y: torch.Tensor  # [N] int64
    num_classes: int
    input_shape: tuple[int, ...]


Options = tuple[tuple[str, bool | int | float | str], ...]


@lru_cache(maxsize=4)
def _dataset(name: str, seed: int, options: Options = (), validation: int = 0) -> Dataset:
    if validation:  # the server's split (tasks.plugins.run_dataset): same arrays, same seed
        return hold_out_validation(_dataset(name, seed, options), validation, seed)
    return load_dataset(name, seed=seed, options=dict(options))


def shared_dataset(name: str, seed: int, options: Options = (), validation: int = 0) -> Dataset:
    """The dataset, parsed once per process (mnist5k's CSV takes seconds to parse); with
    ``validation`` > 0 its training set lacks the held-out validation examples."""
    return _dataset(name, seed, options, validation)


@lru_cache(maxsize=4)
def _partition_indices(
    name: str,
    seed: int,
    options: Options,
    scheme: str,
    num_partitions: int,
    alpha: float,
    shards: int,
    size: int,
    validation: int = 0,
) -> tuple[np.ndarray, ...]:
    ds = _dataset(name, seed, options, validation)
    part = make_partition(scheme, ds.y_train, num_partitions, seed, alpha, shards, size)
    return part.indices


def local_data(cfg: LeanfedConfig, node_config: dict[str, bool | float | int | str]) -> LocalData:
    """Data for this node.

    A deployed SuperNode passes ``--node-config 'data-path="/site/data.npz"'`` and reads
    only its own file; a simulated node gets ``partition-id``/``num-partitions`` from
    Flower's simulation engine and takes that slice of the shipped dataset.
    """
    if "data-path" in node_config:
        path = str(node_config["data-path"])
        kind = "csv" if path.endswith(".csv") else "npz"
        ds = load_dataset(f"{kind}:{path}", seed=cfg.seed, options=site_options(cfg, kind))
        x, y = ds.x_train, ds.y_train
    else:
        if "partition-id" not in node_config:
            raise ValueError(
                "node_config needs 'partition-id' (simulation) or 'data-path' (deployed)"
            )
        pid = int(node_config["partition-id"])
        n = int(node_config.get("num-partitions", cfg.num_partitions))
        if not 0 <= pid < n:
            raise ValueError(f"partition-id {pid} out of range for {n} partitions")
        options = frozen_options(cfg, "dataset")
        ds = _dataset(cfg.dataset, cfg.seed, options, cfg.validation_size)
        ix = _partition_indices(
            cfg.dataset,
            cfg.seed,
            options,
            cfg.partition_scheme,
            n,
            cfg.partition_alpha,
            cfg.partition_shards,
            cfg.partition_sample_size,
            cfg.validation_size,
        )[pid]
        x, y = ds.x_train[ix], ds.y_train[ix]
    return LocalData(
        x=torch.as_tensor(np.ascontiguousarray(x), dtype=torch.float32),
        y=torch.as_tensor(y, dtype=torch.int64),
        num_classes=ds.num_classes,
        input_shape=tuple(ds.input_shape),
    )
