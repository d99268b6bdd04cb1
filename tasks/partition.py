"""Seeded partitioners (IID, Dirichlet, shards); in tasks/ so a ClientApp can find its own."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Partition:
    """Indices of the training set held by each client."""

    scheme: str
    indices: tuple[np.ndarray, ...]  # one int64 array per client

    @property
    def sizes(self) -> list[int]:
        return [len(ix) for ix in self.indices]

    def label_counts(self, labels: np.ndarray, num_classes: int) -> np.ndarray:
        """[num_clients, num_classes] counts, for reporting heterogeneity."""
        return np.stack([np.bincount(labels[ix], minlength=num_classes) for ix in self.indices])


def _check(num_clients: int, n: int) -> None:
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    if n < num_clients:
        raise ValueError(f"cannot split {n} examples over {num_clients} clients")


def iid(labels: np.ndarray, num_clients: int, seed: int) -> Partition:
    """Uniformly shuffled, equal-sized (±1) shards."""
    _check(num_clients, len(labels))
    perm = np.random.default_rng(seed).permutation(len(labels))
    return Partition("iid", tuple(np.sort(p) for p in np.array_split(perm, num_clients)))


def dirichlet(
    labels: np.ndarray, num_clients: int, alpha: float, seed: int, min_size: int = 2
) -> Partition:
    """Per-class proportions drawn from Dir(alpha) (Hsu, Qi & Brown 2019).

    Smaller alpha -> more skewed label distributions. Draws are repeated (with the
    same seeded generator) until every client holds at least ``min_size`` examples,
    so no client is empty.
    """
    _check(num_clients, len(labels))
    if alpha <= 0:
        raise ValueError(f"dirichlet alpha must be > 0, got {alpha}")
    if min_size * num_clients > len(labels):
        raise ValueError(f"min_size={min_size} x {num_clients} clients exceeds {len(labels)}")
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    for _ in range(1000):
        buckets: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(labels == c))
            props = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(props)[:-1] * len(idx)).astype(int)
            for k, part in enumerate(np.split(idx, cuts)):
                buckets[k].append(part)
        parts = [np.sort(np.concatenate(b)).astype(np.int64) for b in buckets]
        if min(len(p) for p in parts) >= min_size:
            return Partition(f"dirichlet({alpha})", tuple(parts))
    raise ValueError(f"could not draw a Dirichlet({alpha}) split with min_size={min_size}")


def label_shards(
    labels: np.ndarray, num_clients: int, shards_per_client: int, seed: int
) -> Partition:
    """Sort by label, cut equal shards, deal ``shards_per_client`` to each (McMahan 2017)."""
    _check(num_clients, len(labels))
    n_shards = num_clients * shards_per_client
    if n_shards > len(labels):
        raise ValueError(f"{n_shards} shards exceed {len(labels)} examples")
    rng = np.random.default_rng(seed)
    order = np.argsort(labels, kind="stable")
    shards = np.array_split(order, n_shards)
    deal = rng.permutation(n_shards).reshape(num_clients, shards_per_client)
    parts = tuple(
        np.sort(np.concatenate([shards[s] for s in row])).astype(np.int64) for row in deal
    )
    return Partition(f"shards({shards_per_client})", parts)


def sample(labels: np.ndarray, num_clients: int, size: int, seed: int) -> Partition:
    """Each client draws ``size`` distinct examples on its own: overlapping IID samples.

    For simulations with more clients than examples (10,000 clients of a 1,437-example
    set); client k's draw depends only on (seed, k), not on the number of clients.
    """
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    if not 1 <= size <= len(labels):
        raise ValueError(f"sample size {size} must be in [1, {len(labels)}]")
    parts = tuple(
        np.sort(np.random.default_rng([seed, k]).choice(len(labels), size, replace=False))
        for k in range(num_clients)
    )
    return Partition(f"sample({size})", parts)


def make_partition(
    scheme: str,
    labels: np.ndarray,
    num_clients: int,
    seed: int,
    alpha: float = 0.5,
    shards_per_client: int = 2,
    sample_size: int = 16,
) -> Partition:
    """Partition by scheme name: "iid", "dirichlet", "shards" or "sample"."""
    if scheme == "iid":
        return iid(labels, num_clients, seed)
    if scheme == "dirichlet":
        return dirichlet(labels, num_clients, alpha, seed)
    if scheme == "shards":
        return label_shards(labels, num_clients, shards_per_client, seed)
    if scheme == "sample":
        return sample(labels, num_clients, sample_size, seed)
    raise ValueError(
        f"unknown partition scheme {scheme!r}; expected iid, dirichlet, shards or sample"
    )
