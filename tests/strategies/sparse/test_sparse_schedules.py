import math

import pytest

from strategies.sparse.schedules import CosineDecay, GMPSchedule


def test_cosine_decay_values() -> None:
    s = CosineDecay(init_fraction=0.3, update_interval=10, end_step=100)
    assert s(0) is None
    assert s(5) is None
    assert s(10) == pytest.approx(0.15 * (1 + math.cos(math.pi * 0.1)))
    assert s(50) == pytest.approx(0.15)  # half-way: alpha / 2
    assert s(90) == pytest.approx(0.15 * (1 + math.cos(math.pi * 0.9)))
    assert s(100) is None  # updates stop at end_step
    assert s(110) is None
    assert s.fraction(0) == pytest.approx(0.3)
    assert s.fraction(100) == pytest.approx(0.0)


def test_cosine_decay_validation() -> None:
    with pytest.raises(ValueError, match="init_fraction"):
        CosineDecay(1.5)
    with pytest.raises(ValueError, match="update_interval"):
        CosineDecay(0.3, 0)


def test_gmp_cubic_values() -> None:
    s = GMPSchedule(final_density=0.1, start_step=10, end_step=50, update_interval=10)
    assert s(5) is None
    assert s(10) == pytest.approx(1.0)
    assert s(15) is None
    # d_t = d_f + (d_i - d_f) (1 - p)^3
    assert s(20) == pytest.approx(0.1 + 0.9 * 0.75**3)
    assert s(30) == pytest.approx(0.1 + 0.9 * 0.5**3)
    assert s(50) == pytest.approx(0.1)
    assert s(60) is None
    assert s.density(100) == pytest.approx(0.1)


def test_gmp_fires_at_end_even_off_interval() -> None:
    s = GMPSchedule(final_density=0.2, start_step=0, end_step=25, update_interval=10)
    assert [t for t in range(30) if s(t) is not None] == [0, 10, 20, 25]
    assert s(25) == pytest.approx(0.2)


def test_gmp_validation() -> None:
    with pytest.raises(ValueError, match="end_step"):
        GMPSchedule(0.1, 10, 10, 1)
    with pytest.raises(ValueError, match="final_density"):
        GMPSchedule(0.0, 0, 10, 1)
    with pytest.raises(ValueError, match="init_density"):
        GMPSchedule(0.5, 0, 10, 1, init_density=0.4)
