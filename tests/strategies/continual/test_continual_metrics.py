"""CL metrics pinned on hand-computed 3x3 accuracy matrices (arithmetic in the comments)."""

from __future__ import annotations

import numpy as np
import pytest

from strategies.continual.metrics import (
    AccuracyMatrix,
    average_accuracy,
    bwt_avalanche,
    bwt_gem,
    forgetting_avalanche,
    forgetting_chaudhry,
    forward_transfer_avalanche,
    fwt_gem,
    per_task_forgetting_chaudhry,
)

# R[i, j] = accuracy on task j after training experience i.
R1 = np.array(
    [
        [0.9, 0.1, 0.2],
        [0.6, 0.8, 0.3],
        [0.7, 0.5, 0.9],
    ]
)
B1 = np.array([0.1, 0.2, 0.1])  # random-init accuracy per task

# Task 0 improves after experience 1 (positive backward transfer), then drops:
# here Chaudhry (max over earlier rows) and Avalanche (row right after training) differ.
R2 = np.array(
    [
        [0.5, 0.1, 0.1],
        [0.8, 0.7, 0.2],
        [0.6, 0.7, 0.9],
    ]
)


def test_matrix_one() -> None:
    # ACC = (0.7 + 0.5 + 0.9) / 3 = 0.7
    assert average_accuracy(R1) == pytest.approx(0.7)
    # GEM BWT = ((0.7 - 0.9) + (0.5 - 0.8)) / 2 = (-0.2 - 0.3) / 2 = -0.25
    assert bwt_gem(R1) == pytest.approx(-0.25)
    # GEM FWT = ((R[0,1] - b1) + (R[1,2] - b2)) / 2 = ((0.1 - 0.2) + (0.3 - 0.1)) / 2 = 0.05
    assert fwt_gem(R1, B1) == pytest.approx(0.05)
    # Chaudhry: f0 = max(0.9, 0.6) - 0.7 = 0.2; f1 = max(0.1, 0.8) - 0.5 = 0.3; mean 0.25
    assert per_task_forgetting_chaudhry(R1) == pytest.approx([0.2, 0.3])
    assert forgetting_chaudhry(R1) == pytest.approx(0.25)
    # Avalanche: (R00 - R20 + R11 - R21) / 2 = (0.2 + 0.3) / 2 = 0.25; BWT = -0.25
    assert forgetting_avalanche(R1) == pytest.approx(0.25)
    assert bwt_avalanche(R1) == pytest.approx(-0.25)
    # Avalanche FWT with b as the model's own init accuracy: same arithmetic as GEM = 0.05
    assert forward_transfer_avalanche(R1, B1) == pytest.approx(0.05)


def test_matrix_two_chaudhry_and_avalanche_differ() -> None:
    # Chaudhry: f0 = max(0.5, 0.8) - 0.6 = 0.2; f1 = max(0.1, 0.7) - 0.7 = 0.0; mean 0.1
    assert forgetting_chaudhry(R2) == pytest.approx(0.1)
    # Avalanche: (0.5 - 0.6) + (0.7 - 0.7) = -0.1; / 2 = -0.05 (negative: net improvement)
    assert forgetting_avalanche(R2) == pytest.approx(-0.05)
    # GEM BWT = ((0.6 - 0.5) + (0.7 - 0.7)) / 2 = 0.05 == -Avalanche forgetting
    assert bwt_gem(R2) == pytest.approx(0.05)
    assert bwt_avalanche(R2) == pytest.approx(bwt_gem(R2))
    # Chaudhry >= Avalanche always (max over rows >= the row right after training)
    assert forgetting_chaudhry(R2) >= forgetting_avalanche(R2)


def test_after_intermediate_experience() -> None:
    # after = 1: ACC = (0.8 + 0.7) / 2 = 0.75; BWT = 0.8 - 0.5 = 0.3
    assert average_accuracy(R2, after=1) == pytest.approx(0.75)
    assert bwt_gem(R2, after=1) == pytest.approx(0.3)
    # Chaudhry after 1: max_{l<1} R[l,0] - R[1,0] = 0.5 - 0.8 = -0.3; Avalanche the same
    assert forgetting_chaudhry(R2, after=1) == pytest.approx(-0.3)
    assert forgetting_avalanche(R2, after=1) == pytest.approx(-0.3)
    # FWT after 1: R[0,1] - b1 = 0.1 - 0.2 = -0.1
    assert fwt_gem(R1, B1, after=1) == pytest.approx(-0.1)
    # after = 0: transfer and forgetting are undefined -> 0.0; ACC = R[0,0]
    assert average_accuracy(R1, after=0) == pytest.approx(0.9)
    assert bwt_gem(R1, after=0) == forgetting_chaudhry(R1, after=0) == 0.0


def test_missing_entries_and_bad_shapes() -> None:
    lower = R1.copy()
    lower[np.triu_indices(3, k=1)] = np.nan  # only trained-so-far tasks evaluated
    # ACC, BWT and forgetting need only the lower triangle; Chaudhry's max then skips l < j.
    assert average_accuracy(lower) == pytest.approx(0.7)
    assert forgetting_chaudhry(lower) == pytest.approx(0.25)
    with pytest.raises(ValueError, match=r"R\[0, 1\]"):
        fwt_gem(lower, B1)
    with pytest.raises(ValueError, match="square"):
        average_accuracy(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="after"):
        bwt_gem(R1, after=3)
    with pytest.raises(ValueError, match="baseline"):
        fwt_gem(R1, np.zeros(2))
    with pytest.raises(ValueError, match="baseline"):
        fwt_gem(R1, None)


def test_accuracy_matrix_accumulator() -> None:
    m = AccuracyMatrix(3)
    for i in range(3):
        for j in range(3):
            m.record(i, j, float(R1[i, j]))
    s = m.summary()
    assert "fwt_gem" not in s  # no baseline yet
    for j, b in enumerate(B1):
        m.record_baseline(j, float(b))
    s = m.summary()
    assert s["acc"] == pytest.approx(0.7) and s["fwt_gem"] == pytest.approx(0.05)
    assert s["forgetting_chaudhry"] == pytest.approx(0.25)
    assert m.to_list()[0] == pytest.approx([0.9, 0.1, 0.2])
    empty = AccuracyMatrix(2)
    empty.record(0, 0, 0.5)
    assert empty.to_list() == [[0.5, None], [None, None]]
    with pytest.raises(ValueError, match="outside"):
        m.record(3, 0, 0.1)
    with pytest.raises(ValueError, match="accuracy"):
        m.record(0, 0, 1.5)
