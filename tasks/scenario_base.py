"""The Scenario record: a CL benchmark's task pools split over K clients, with task boundaries.

Each task's training pool is split over the K clients by a seeded permutation of its
indices (``np.array_split``: sizes differ by at most one). Clients reach task boundaries
in round ``boundary_round(client, task)``: all at once by default, or with seeded
per-client delays (``with_async_arrival``). Transforms run lazily when a client's stream
materialises an experience, so a client never holds more than its current experience.
The shipped scenarios are built in ``tasks.scenarios``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Protocol

import numpy as np
import torch

from tasks.stream import ClientStream, Experience


class DatasetLike(Protocol):
    """The fields of ``tasks.datasets.Dataset`` a scenario reads."""

    @property
    def x_train(self) -> np.ndarray: ...
    @property
    def y_train(self) -> np.ndarray: ...
    @property
    def x_test(self) -> np.ndarray: ...
    @property
    def y_test(self) -> np.ndarray: ...
    @property
    def num_classes(self) -> int: ...
    @property
    def input_shape(self) -> tuple[int, ...]: ...


Transform = Callable[[int, np.ndarray], np.ndarray]  # (task, x [N, *shape]) -> x' same shape


def load_data(name: str, seed: int) -> DatasetLike:
    # Imported lazily: tasks.datasets loads data files; tests inject small arrays instead.
    from tasks.datasets import load_dataset

    return load_dataset(name, seed=seed)


def _identity(task: int, x: np.ndarray) -> np.ndarray:
    return x


def split_indices(pool: np.ndarray, num_clients: int, seed: int, task: int) -> list[np.ndarray]:
    """Seeded split of one task's pool over clients: sorted index arrays, sizes differ by <= 1."""
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    if len(pool) < num_clients:
        raise ValueError(f"task {task} has {len(pool)} examples, fewer than {num_clients} clients")
    perm = np.random.default_rng([seed, task]).permutation(pool)
    return [np.sort(p) for p in np.array_split(perm, num_clients)]


def sync_boundaries(num_clients: int, num_tasks: int, rounds_per_task: int) -> np.ndarray:
    """[K, T] rounds (1-based): every client starts task t in round 1 + t * rounds_per_task."""
    if rounds_per_task < 1:
        raise ValueError(f"rounds_per_task must be >= 1, got {rounds_per_task}")
    row = 1 + rounds_per_task * np.arange(num_tasks, dtype=np.int64)
    return np.tile(row, (num_clients, 1))


def async_boundaries(
    num_clients: int, num_tasks: int, rounds_per_task: int, max_delay: int, seed: int
) -> np.ndarray:
    """[K, T] rounds with a seeded delay d[k, t] ~ U{0..max_delay} per client and task >= 1.

    boundary[k, t] = 1 + t * rounds_per_task + d[k, t]; task 0 starts in round 1 for all.
    max_delay < rounds_per_task keeps every client's boundaries strictly increasing.
    """
    if not 0 <= max_delay < rounds_per_task:
        raise ValueError(
            f"max_delay must be in [0, rounds_per_task={rounds_per_task}), got {max_delay}"
        )
    base = sync_boundaries(num_clients, num_tasks, rounds_per_task)
    delay = np.random.default_rng([seed, 0xA5]).integers(
        0, max_delay + 1, size=(num_clients, num_tasks)
    )
    delay[:, 0] = 0
    return base + delay


@dataclass(frozen=True, eq=False)
class Scenario:
    """Per-task data pools split over clients, lazy transforms, per-task test sets."""

    name: str
    setting: str  # "class-incremental" | "domain-incremental"
    data: DatasetLike
    task_classes: tuple[tuple[int, ...], ...]  # [T] classes of each task
    train_pools: tuple[np.ndarray, ...]  # [T] indices into data.x_train
    test_pools: tuple[np.ndarray, ...]  # [T] indices into data.x_test
    client_indices: tuple[tuple[np.ndarray, ...], ...]  # [K][T] indices into data.x_train
    boundaries: np.ndarray  # [K, T] round in which client k starts task t
    transform: Transform = _identity

    @property
    def num_tasks(self) -> int:
        return len(self.task_classes)

    @property
    def num_clients(self) -> int:
        return len(self.client_indices)

    @property
    def num_classes(self) -> int:
        return int(self.data.num_classes)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.data.input_shape)

    def boundary_round(self, client: int, task: int) -> int:
        """Server round in which ``client`` starts experience ``task``."""
        self._check(client, task)
        return int(self.boundaries[client, task])

    def _check(self, client: int, task: int) -> None:
        if not 0 <= client < self.num_clients:
            raise IndexError(f"client {client} outside {self.num_clients} clients")
        if not 0 <= task < self.num_tasks:
            raise IndexError(f"task {task} outside {self.num_tasks} tasks")

    def _materialise(self, task: int, x: np.ndarray, y: np.ndarray) -> Experience:
        xt = self.transform(task, x).astype(np.float32, copy=False)
        return Experience(
            task_id=task,
            x=torch.from_numpy(np.ascontiguousarray(xt)),
            y=torch.from_numpy(y.astype(np.int64)),
            classes=self.task_classes[task],
        )

    def client_experience(self, client: int, task: int) -> Experience:
        """Client ``client``'s share of task ``task`` (transform applied)."""
        self._check(client, task)
        ix = self.client_indices[client][task]
        return self._materialise(task, self.data.x_train[ix], self.data.y_train[ix])

    def stream(self, client: int) -> ClientStream:
        """The lazy stream of one client, with its round boundaries."""
        self._check(client, 0)
        return ClientStream(
            lambda t: self.client_experience(client, t),
            self.num_tasks,
            boundaries=[int(b) for b in self.boundaries[client]],
        )

    def streams(self) -> list[ClientStream]:
        return [self.stream(k) for k in range(self.num_clients)]

    def test_set(self, task: int) -> Experience:
        """Task ``task``'s test set, for column ``task`` of the accuracy matrix."""
        self._check(0, task)
        ix = self.test_pools[task]
        return self._materialise(task, self.data.x_test[ix], self.data.y_test[ix])

    def with_async_arrival(self, rounds_per_task: int, max_delay: int, seed: int) -> Scenario:
        """Same data; clients reach boundaries with seeded per-client delays."""
        b = async_boundaries(self.num_clients, self.num_tasks, rounds_per_task, max_delay, seed)
        return replace(self, boundaries=b)


def build_scenario(
    name: str,
    setting: str,
    data: DatasetLike,
    task_classes: Sequence[Sequence[int]],
    train_pools: Sequence[np.ndarray],
    test_pools: Sequence[np.ndarray],
    num_clients: int,
    seed: int,
    rounds_per_task: int,
    transform: Transform = _identity,
) -> Scenario:
    per_task = [split_indices(p, num_clients, seed, t) for t, p in enumerate(train_pools)]
    clients = tuple(tuple(per_task[t][k] for t in range(len(per_task))) for k in range(num_clients))
    return Scenario(
        name=name,
        setting=setting,
        data=data,
        task_classes=tuple(tuple(int(c) for c in cs) for cs in task_classes),
        train_pools=tuple(train_pools),
        test_pools=tuple(test_pools),
        client_indices=clients,
        boundaries=sync_boundaries(num_clients, len(task_classes), rounds_per_task),
        transform=transform,
    )
