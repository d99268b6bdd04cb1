"""Hypothesis over aggregate_train/aggregate_evaluate with mixed honest and hostile replies.

Every bad reply is rejected with a reason, no honest reply is rejected, nothing raises,
and the round equals what the honest replies alone give (so the global stays finite).
"""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from simulations.fuzz_campaign import Federation, Tally, task_identity
from simulations.hostile import EVALUATE_CATEGORIES, SPARSE_ONLY, TRAIN_MAKERS

TRAIN = sorted(TRAIN_MAKERS)
DENSE_TRAIN = sorted(set(TRAIN_MAKERS) - SPARSE_ONLY)


def _play(kind: str, seed: int, rounds: int, train: list[str], evaluate: list[str]) -> Tally:
    tally = Tally()
    rng = random.Random(seed)
    with task_identity():
        fed = Federation(kind, seed)
        for _ in range(rounds):
            fed.play(rng, train, evaluate, tally)
    return tally


def _clean(t: Tally) -> None:
    assert t.crashes == 0, t
    assert t.nonfinite_globals == 0, t
    assert t.honest_rejected == 0, t
    assert t.rejected_without_reason == 0, t
    assert t.hostile_accepted == 0, t


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**20),
    train=st.lists(st.sampled_from(TRAIN), min_size=0, max_size=5),
    evaluate=st.lists(st.sampled_from(EVALUATE_CATEGORIES), min_size=0, max_size=4),
)
def test_sparse_strategy_holds(seed: int, train: list[str], evaluate: list[str]) -> None:
    tally = _play("sparse", seed, 2, train, evaluate)
    _clean(tally)
    assert tally.tried >= 2 * (len(train) + len(evaluate))


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**20),
    train=st.lists(st.sampled_from(DENSE_TRAIN), min_size=0, max_size=5),
    evaluate=st.lists(st.sampled_from(EVALUATE_CATEGORIES), min_size=0, max_size=4),
)
def test_dense_baseline_holds(seed: int, train: list[str], evaluate: list[str]) -> None:
    _clean(_play("dense", seed, 2, train, evaluate))


def test_every_category_is_exercised() -> None:
    tally = _play("sparse", 1, 3, TRAIN[:5], list(EVALUATE_CATEGORIES))
    tally2 = _play("sparse", 2, 3, TRAIN[5:], list(EVALUATE_CATEGORIES[:3]))
    _clean(tally)
    _clean(tally2)
    assert set(tally.by_category) | set(tally2.by_category) == set(TRAIN)
