import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tasks.partition import dirichlet, iid, label_shards, make_partition

LABELS = np.repeat(np.arange(10), 50)  # 500 examples, 50 per class


def _is_exact_cover(parts: tuple[np.ndarray, ...], n: int) -> bool:
    allix = np.concatenate(parts)
    return len(allix) == n and len(np.unique(allix)) == n


def test_iid_sizes_exact() -> None:
    p = iid(LABELS, 7, seed=0)
    assert sorted(p.sizes) == [71, 71, 71, 71, 72, 72, 72]
    assert _is_exact_cover(p.indices, 500)


def test_label_shards_two_classes_each() -> None:
    p = label_shards(LABELS, 10, shards_per_client=2, seed=1)
    assert p.sizes == [50] * 10
    counts = p.label_counts(LABELS, 10)
    assert all((row > 0).sum() <= 2 for row in counts)
    assert _is_exact_cover(p.indices, 500)


def test_dirichlet_seeded_and_skewed() -> None:
    a = dirichlet(LABELS, 10, alpha=0.1, seed=3)
    b = dirichlet(LABELS, 10, alpha=0.1, seed=3)
    assert all(np.array_equal(x, y) for x, y in zip(a.indices, b.indices, strict=True))
    assert _is_exact_cover(a.indices, 500)
    # alpha=0.1 concentrates each client on few classes; alpha=100 spreads them.
    skew = (a.label_counts(LABELS, 10) > 0).sum(axis=1).mean()
    flat = (dirichlet(LABELS, 10, alpha=100.0, seed=3).label_counts(LABELS, 10) > 0).sum(1).mean()
    assert skew < flat


@settings(max_examples=25, deadline=None)
@given(
    k=st.integers(1, 20), seed=st.integers(0, 10_000), scheme=st.sampled_from(["iid", "dirichlet"])
)
def test_partitions_are_exact_covers(k: int, seed: int, scheme: str) -> None:
    p = make_partition(scheme, LABELS, k, seed, alpha=0.5)
    assert len(p.indices) == k
    assert _is_exact_cover(p.indices, 500)
    assert min(p.sizes) >= 1


def test_bad_inputs_name_the_problem() -> None:
    with pytest.raises(ValueError, match="alpha"):
        dirichlet(LABELS, 3, alpha=0.0, seed=0)
    with pytest.raises(ValueError, match="scheme"):
        make_partition("weird", LABELS, 3, 0)
    with pytest.raises(ValueError, match="cannot split"):
        iid(LABELS[:2], 3, 0)


@settings(max_examples=25, deadline=None)
@given(k=st.integers(1, 50), size=st.integers(1, 40), seed=st.integers(0, 10_000))
def test_sample_gives_each_client_its_own_distinct_draw(k: int, size: int, seed: int) -> None:
    p = make_partition("sample", LABELS, k, seed, sample_size=size)
    assert p.sizes == [size] * k
    assert all(len(np.unique(ix)) == size and ix.max() < 500 for ix in p.indices)
    # A client's draw does not depend on how many clients there are.
    more = make_partition("sample", LABELS, k + 3, seed, sample_size=size)
    assert all(np.array_equal(a, b) for a, b in zip(p.indices, more.indices[:k], strict=True))


def test_sample_serves_more_clients_than_examples() -> None:
    p = make_partition("sample", LABELS[:20], 1000, 0, sample_size=4)
    assert len(p.indices) == 1000
    with pytest.raises(ValueError, match="sample size"):
        make_partition("sample", LABELS[:20], 3, 0, sample_size=21)
