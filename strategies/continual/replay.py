"""Bounded reservoir replay buffer (Vitter 1985, algorithm R), seeded and serializable.

Every example of the stream seen so far is in the buffer with the same probability
capacity / seen, whatever the task order, which is why reservoir sampling is the
standard experience-replay memory in continual learning (Chaudhry et al. 2019,
"On tiny episodic memories in continual learning").
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch

_STATE_VERSION = 1


class ReservoirBuffer:
    """At most ``capacity`` (x, y) pairs; uniform over everything ever ``add``-ed."""

    def __init__(self, capacity: int, seed: int = 0) -> None:
        if capacity < 0:
            raise ValueError(f"replay capacity must be >= 0, got {capacity}")
        self.capacity = capacity
        self.seen = 0  # examples offered so far (n in algorithm R)
        self._rng = np.random.default_rng(seed)  # PCG64: state is a small dict of ints
        self._x: torch.Tensor | None = None  # [capacity, *example_shape]
        self._y: torch.Tensor | None = None  # [capacity]

    def __len__(self) -> int:
        return min(self.seen, self.capacity)

    @property
    def nbytes(self) -> int:
        """Bytes held by stored examples (the bound a context.state budget cares about)."""
        n = len(self)
        if self._x is None or self._y is None:
            return 0
        return n * (self._x[0].numel() * self._x.element_size() + self._y.element_size())

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Offer a batch x: [B, *shape], y: [B]; each example goes through algorithm R."""
        if x.ndim < 1 or y.ndim != 1 or x.shape[0] != y.shape[0]:
            raise ValueError(
                f"replay add needs x [B, ...] and y [B], got {tuple(x.shape)} and {tuple(y.shape)}"
            )
        if self.capacity == 0:
            self.seen += int(x.shape[0])
            return
        if self._x is None or self._y is None:
            self._x = torch.zeros((self.capacity, *x.shape[1:]), dtype=x.dtype)
            self._y = torch.zeros(self.capacity, dtype=y.dtype)
        elif x.shape[1:] != self._x.shape[1:]:
            raise ValueError(
                f"replay example shape {tuple(x.shape[1:])} != stored {tuple(self._x.shape[1:])}"
            )
        x = x.detach().to(self._x.dtype)
        y = y.detach().to(self._y.dtype)
        for i in range(x.shape[0]):
            # Algorithm R: item number n (0-based) fills slot n while n < capacity; later
            # it replaces slot j ~ U{0..n} if j < capacity (probability capacity/(n+1)).
            n = self.seen
            slot = n if n < self.capacity else int(self._rng.integers(0, n + 1))
            if slot < self.capacity:
                self._x[slot] = x[i]
                self._y[slot] = y[i]
            self.seen += 1

    def sample(
        self, n: int, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Up to n stored examples without replacement (fewer if the buffer holds fewer)."""
        if n < 0:
            raise ValueError(f"sample size must be >= 0, got {n}")
        size = len(self)
        if size == 0 or self._x is None or self._y is None:
            raise ValueError("cannot sample from an empty replay buffer")
        idx = torch.randperm(size, generator=generator)[: min(n, size)]
        return self._x[idx].clone(), self._y[idx].clone()

    def mix(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        n_replay: int,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A training batch: the new batch concatenated with up to n_replay replayed examples."""
        if len(self) == 0 or n_replay == 0:
            return x, y
        rx, ry = self.sample(n_replay, generator)
        return torch.cat([x, rx.to(x.dtype)]), torch.cat([y, ry.to(y.dtype)])

    def state_dict(self) -> dict[str, Any]:
        """Stored examples (only the filled part) + counters + RNG state; size <= capacity.

        x [n, *shape] and y [n] tensors (n = min(seen, capacity)) go to a Flower
        ArrayRecord; version, capacity, seen and rng (JSON str) to a ConfigRecord.
        """
        n = len(self)
        return {
            "version": _STATE_VERSION,
            "capacity": self.capacity,
            "seen": self.seen,
            # JSON text: PCG64's 128-bit state ints do not fit a Flower ConfigRecord int64.
            "rng": json.dumps(self._rng.bit_generator.state),
            "x": None if self._x is None else self._x[:n].clone(),
            "y": None if self._y is None else self._y[:n].clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"replay state version {state.get('version')!r} != {_STATE_VERSION}")
        capacity, seen = int(state["capacity"]), int(state["seen"])
        if capacity != self.capacity:
            raise ValueError(f"replay state capacity {capacity} != buffer capacity {self.capacity}")
        x, y = state["x"], state["y"]
        n = min(seen, capacity)
        held = 0 if x is None or y is None else len(x)
        if (x is None) != (y is None) or held != n or (y is not None and len(y) != n):
            raise ValueError(f"replay state holds {held} examples, expected {n} for seen={seen}")
        self.seen = seen
        self._rng = np.random.default_rng()
        self._rng.bit_generator.state = json.loads(state["rng"])
        if x is None or capacity == 0:
            self._x = self._y = None
            return
        self._x = torch.zeros((capacity, *x.shape[1:]), dtype=x.dtype)
        self._y = torch.zeros(capacity, dtype=y.dtype)
        self._x[:n] = x
        self._y[:n] = y
