"""A client's data stream: a lazy sequence of experiences with a serializable position.

Modelled on Avalanche's benchmark streams (Lomonaco et al. 2021): a stream is an ordered
sequence of *experiences*, each a (task id, data, class set) chunk the learner sees in
turn. Experiences are materialised on demand (a loader per index), so a client only holds
the experience it is training on; the position (which experience, which ones were
announced) is a few ints the ClientApp keeps in Flower ``context.state``.
``FileStream`` is the deployed-client case: the node reads its own stream from a
directory of ``exp_000.npz``, ``exp_001.npz``, ... files.
"""

from __future__ import annotations

import re
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch


class StreamError(ValueError):
    """A stream or stream file is malformed (the message names the file/field)."""


@dataclass(frozen=True, eq=False)
class Experience:
    """One chunk of a stream: x [N, *input_shape] float32, y [N] int64."""

    task_id: int
    x: torch.Tensor
    y: torch.Tensor
    classes: tuple[int, ...]  # the classes this experience is about (sorted)

    def __post_init__(self) -> None:
        if self.y.ndim != 1 or self.x.ndim < 1 or self.x.shape[0] != self.y.shape[0]:
            raise StreamError(
                f"experience {self.task_id}: x {tuple(self.x.shape)} and y {tuple(self.y.shape)} "
                "must share the first dimension and y must be 1-D"
            )

    def __len__(self) -> int:
        return int(self.y.shape[0])


Loader = Callable[[int], Experience]


class ClientStream:
    """Ordered experiences, produced lazily by ``loader(index)``; tracks the position.

    ``position`` is the index of the experience the client is currently on (-1 before
    the first). ``boundaries`` optionally gives the round at which each experience
    starts for this client (asynchronous arrival); ``advance_to_round`` then moves the
    position and returns the experiences whose boundary was crossed, each of which is a
    known task-boundary signal for the drift monitor.
    """

    def __init__(
        self, loader: Loader, length: int, *, boundaries: Sequence[int] | None = None
    ) -> None:
        if length < 0:
            raise StreamError(f"stream length must be >= 0, got {length}")
        if boundaries is not None:
            b = [int(v) for v in boundaries]
            if len(b) != length:
                raise StreamError(f"{len(b)} boundaries for a stream of {length} experiences")
            if any(later <= earlier for earlier, later in zip(b, b[1:], strict=False)):
                raise StreamError(f"boundaries must be strictly increasing, got {b}")
            boundaries = tuple(b)
        self._loader = loader
        self.length = length
        self.boundaries: tuple[int, ...] | None = boundaries
        self.position = -1

    @classmethod
    def from_experiences(
        cls, experiences: Sequence[Experience], *, boundaries: Sequence[int] | None = None
    ) -> ClientStream:
        """A stream over experiences already in memory."""
        exps = list(experiences)
        return cls(lambda i: exps[i], len(exps), boundaries=boundaries)

    def __len__(self) -> int:
        return self.length

    def experience(self, index: int) -> Experience:
        """Materialise experience ``index`` (does not move the position)."""
        if not 0 <= index < self.length:
            raise IndexError(f"experience {index} outside a stream of {self.length}")
        return self._loader(index)

    def current(self) -> Experience:
        """The experience at the current position."""
        if self.position < 0:
            raise StreamError("stream not started: call advance() or advance_to_round() first")
        return self.experience(self.position)

    @property
    def finished(self) -> bool:
        return self.position >= self.length - 1

    def advance(self) -> Experience:
        """Move to the next experience and return it; StopIteration at the end."""
        if self.position + 1 >= self.length:
            raise StopIteration
        self.position += 1
        return self.experience(self.position)

    def __iter__(self) -> Iterator[Experience]:
        """Yield the remaining experiences, advancing the position."""
        while self.position + 1 < self.length:
            yield self.advance()

    def index_for_round(self, server_round: int) -> int:
        """Experience index active at ``server_round`` per ``boundaries`` (-1 before the first)."""
        if self.boundaries is None:
            raise StreamError("stream has no round boundaries")
        return sum(1 for b in self.boundaries if b <= server_round) - 1

    def advance_to_round(self, server_round: int) -> list[int]:
        """Move to the experience active at ``server_round``; return newly entered indices.

        Several boundaries may be crossed at once if the client skipped rounds (it was not
        sampled); each is reported. Never moves backwards.
        """
        target = self.index_for_round(server_round)
        entered = list(range(self.position + 1, target + 1))
        if entered:
            self.position = target
        return entered

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position, "length": self.length}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        length, position = int(state["length"]), int(state["position"])
        if length != self.length:
            raise StreamError(f"stream state is for {length} experiences, stream has {self.length}")
        if not -1 <= position < max(length, 0):
            raise StreamError(f"stream position {position} outside [-1, {length})")
        self.position = position


_EXP_FILE = re.compile(r"^exp_(\d{3,})\.npz$")


def load_experience_file(path: Path, index: int) -> Experience:
    """Read one ``exp_NNN.npz`` (keys x, y; optional task_id, classes) with clear errors."""
    try:
        with np.load(path, allow_pickle=False) as data:
            keys = set(data.files)
            missing = {"x", "y"} - keys
            if missing:
                raise StreamError(
                    f"{path}: missing array(s) {sorted(missing)} (has {sorted(keys)})"
                )
            x, y = np.asarray(data["x"]), np.asarray(data["y"])
            task_id = index
            if "task_id" in keys:
                t = np.asarray(data["task_id"])
                if t.size != 1 or not np.issubdtype(t.dtype, np.integer):
                    raise StreamError(f"{path}: task_id must be one integer, got {t!r}")
                task_id = int(t.reshape(()))
            classes_arr = np.asarray(data["classes"]) if "classes" in keys else None
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        if isinstance(err, StreamError):
            raise
        raise StreamError(f"{path}: not a readable .npz file ({err})") from err
    if x.ndim < 2:
        raise StreamError(f"{path}: x must be [N, features...], got shape {x.shape}")
    if y.ndim != 1 or y.shape[0] != x.shape[0]:
        raise StreamError(f"{path}: y must be [N] with N = {x.shape[0]}, got shape {y.shape}")
    if not np.issubdtype(x.dtype, np.number):
        raise StreamError(f"{path}: x must be numeric, got dtype {x.dtype}")
    if not np.issubdtype(y.dtype, np.integer):
        raise StreamError(f"{path}: y must hold integer labels, got dtype {y.dtype}")
    if not np.isfinite(x).all():
        raise StreamError(f"{path}: x contains NaN or inf")
    if y.size and y.min() < 0:
        raise StreamError(f"{path}: y contains negative labels")
    classes = (
        tuple(sorted(int(c) for c in np.unique(y)))
        if classes_arr is None
        else tuple(sorted(int(c) for c in classes_arr.ravel()))
    )
    return Experience(
        task_id=task_id,
        x=torch.from_numpy(x.astype(np.float32, copy=False)),
        y=torch.from_numpy(y.astype(np.int64, copy=False)),
        classes=classes,
    )


class FileStream(ClientStream):
    """A deployed client's stream: ``directory/exp_000.npz``, ``exp_001.npz``, ... read lazily."""

    def __init__(self, directory: str | Path, *, boundaries: Sequence[int] | None = None) -> None:
        root = Path(directory)
        if not root.is_dir():
            raise StreamError(f"stream directory {root} does not exist")
        found: dict[int, Path] = {}
        for p in root.iterdir():
            m = _EXP_FILE.match(p.name)
            if m:
                found[int(m.group(1))] = p
        if not found:
            raise StreamError(f"stream directory {root} holds no exp_NNN.npz files")
        expected = list(range(len(found)))
        if sorted(found) != expected:
            gap = next(i for i in expected if i not in found)
            raise StreamError(
                f"stream directory {root}: experience files must be numbered from exp_000 "
                f"without gaps; exp_{gap:03d}.npz is missing"
            )
        self.files = tuple(found[i] for i in expected)
        super().__init__(
            lambda i: load_experience_file(self.files[i], i),
            len(self.files),
            boundaries=boundaries,
        )


def write_experience_file(path: str | Path, exp: Experience) -> None:
    """Write an experience in the ``FileStream`` format (for tests and data preparation)."""
    np.savez(
        Path(path),
        x=exp.x.numpy(),
        y=exp.y.numpy(),
        task_id=np.int64(exp.task_id),
        classes=np.asarray(exp.classes, dtype=np.int64),
    )
