"""Client streams: lazy experiences, position state, round boundaries, NPZ file streams."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tasks.stream import (
    ClientStream,
    Experience,
    FileStream,
    StreamError,
    write_experience_file,
)


def exp(task: int, n: int = 3) -> Experience:
    return Experience(task, torch.full((n, 2), float(task)), torch.full((n,), task), (task,))


def test_lazy_loading_and_position() -> None:
    loaded: list[int] = []

    def loader(i: int) -> Experience:
        loaded.append(i)
        return exp(i)

    s = ClientStream(loader, 3)
    assert loaded == [] and s.position == -1
    with pytest.raises(StreamError, match="not started"):
        s.current()
    assert s.advance().task_id == 0
    assert loaded == [0]  # only what was asked for
    assert [e.task_id for e in s] == [1, 2]
    assert s.finished and s.position == 2
    with pytest.raises(StopIteration):
        s.advance()


def test_state_roundtrip() -> None:
    s = ClientStream.from_experiences([exp(0), exp(1), exp(2)])
    s.advance()
    s.advance()
    t = ClientStream.from_experiences([exp(0), exp(1), exp(2)])
    t.load_state_dict(s.state_dict())
    assert t.position == 1 and t.current().task_id == 1
    with pytest.raises(StreamError, match="3 experiences"):
        ClientStream.from_experiences([exp(0)]).load_state_dict(s.state_dict())


def test_round_boundaries_report_crossed_experiences() -> None:
    s = ClientStream.from_experiences([exp(0), exp(1), exp(2)], boundaries=[1, 4, 6])
    assert s.advance_to_round(1) == [0]
    assert s.advance_to_round(3) == []
    assert s.advance_to_round(7) == [1, 2]  # client not sampled in rounds 4-6: both crossed
    assert s.position == 2
    assert s.advance_to_round(2) == []  # never moves back
    with pytest.raises(StreamError, match="increasing"):
        ClientStream.from_experiences([exp(0), exp(1)], boundaries=[3, 3])
    with pytest.raises(StreamError, match="boundaries"):
        ClientStream.from_experiences([exp(0), exp(1)], boundaries=[1])


def test_experience_validates_shapes() -> None:
    with pytest.raises(StreamError, match="first dimension"):
        Experience(0, torch.zeros(3, 2), torch.zeros(2, dtype=torch.long), (0,))


def test_file_stream_reads_npz_directory(tmp_path: Path) -> None:
    for i in range(3):
        write_experience_file(tmp_path / f"exp_{i:03d}.npz", exp(i + 10, n=i + 1))
    (tmp_path / "notes.txt").write_text("ignored")
    s = FileStream(tmp_path)
    assert len(s) == 3
    e = s.advance()
    assert e.task_id == 10 and len(e) == 1 and e.classes == (10,)
    assert e.x.dtype == torch.float32 and e.y.dtype == torch.int64
    # task_id and classes are optional: defaults are the file index and the labels seen
    np.savez(tmp_path / "exp_003.npz", x=np.zeros((2, 2)), y=np.array([4, 1]))
    last = FileStream(tmp_path).experience(3)
    assert last.task_id == 3 and last.classes == (1, 4)


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"x": np.zeros((2, 2))}, r"missing array\(s\) \['y'\]"),
        ({"x": np.zeros((2, 2)), "y": np.zeros(3, dtype=np.int64)}, "y must be"),
        ({"x": np.zeros((2, 2)), "y": np.zeros(2)}, "integer labels"),
        ({"x": np.zeros(2), "y": np.zeros(2, dtype=np.int64)}, "x must be"),
        ({"x": np.full((1, 2), np.nan), "y": np.zeros(1, dtype=np.int64)}, "NaN"),
        (
            {"x": np.zeros((1, 2)), "y": np.zeros(1, dtype=np.int64), "task_id": np.array([1, 2])},
            "task_id",
        ),
    ],
)
def test_malformed_file_names_the_file(tmp_path: Path, arrays: dict, message: str) -> None:
    np.savez(tmp_path / "exp_000.npz", **arrays)
    s = FileStream(tmp_path)
    with pytest.raises(StreamError, match=message) as err:
        s.advance()
    assert "exp_000.npz" in str(err.value)


def test_bad_directories(tmp_path: Path) -> None:
    with pytest.raises(StreamError, match="does not exist"):
        FileStream(tmp_path / "nope")
    with pytest.raises(StreamError, match="no exp_NNN.npz"):
        FileStream(tmp_path)
    write_experience_file(tmp_path / "exp_000.npz", exp(0))
    write_experience_file(tmp_path / "exp_002.npz", exp(2))
    with pytest.raises(StreamError, match="exp_001.npz is missing"):
        FileStream(tmp_path)
    (tmp_path / "exp_002.npz").unlink()
    (tmp_path / "exp_001.npz").write_bytes(b"not a zip")
    with pytest.raises(StreamError, match="exp_001.npz: not a readable"):
        FileStream(tmp_path).experience(1)
