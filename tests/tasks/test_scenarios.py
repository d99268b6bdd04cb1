"""CL scenarios on shipped data: exact task classes and sizes, transforms, shift, async arrival."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tasks.datasets import Dataset, load_dataset
from tasks.scenarios import (
    SCENARIOS,
    CovariateShift,
    Scenario,
    async_boundaries,
    hospital_stream,
    make_scenario,
    permuted_mnist,
    pixel_permutations,
    rotate_images,
    rotated_mnist,
    split_mnist,
    sync_boundaries,
)


@pytest.fixture(scope="module")
def mnist() -> Dataset:
    return load_dataset("mnist5k", seed=0)  # 4000 train / 1000 test, 400 / 100 per digit


@pytest.fixture(scope="module")
def cancer() -> Dataset:
    return load_dataset("breast_cancer", seed=0)  # 455 train / 114 test, 30 features


def assert_partition(s: Scenario, task: int) -> None:
    """Clients' shares of a task are disjoint, cover the pool, and differ in size by <= 1."""
    parts = [s.client_indices[k][task] for k in range(s.num_clients)]
    joined = np.concatenate(parts)
    assert len(np.unique(joined)) == len(joined)
    assert np.array_equal(np.sort(joined), np.sort(s.train_pools[task]))
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1


def test_split_mnist_exact_classes_and_sizes(mnist: Dataset) -> None:
    s = split_mnist(3, seed=0, data=mnist)
    assert s.setting == "class-incremental" and s.num_tasks == 5 and s.num_classes == 10
    assert s.task_classes == ((0, 1), (2, 3), (4, 5), (6, 7), (8, 9))
    for t in range(5):
        assert len(s.train_pools[t]) == 800  # 2 digits x 400
        assert [len(s.client_indices[k][t]) for k in range(3)] == [267, 267, 266]  # 800 / 3
        assert_partition(s, t)
        e = s.client_experience(1, t)
        assert set(e.y.unique().tolist()) == set(s.task_classes[t])
        assert e.classes == s.task_classes[t] and e.task_id == t
        assert e.x.shape == (267, 1, 28, 28) and e.x.dtype == torch.float32
        test = s.test_set(t)
        assert len(test) == 200 and set(test.y.unique().tolist()) == set(s.task_classes[t])
    # Same seed, same split; another seed, another split.
    again = split_mnist(3, seed=0, data=mnist)
    other = split_mnist(3, seed=1, data=mnist)
    assert np.array_equal(again.client_indices[2][4], s.client_indices[2][4])
    assert not np.array_equal(other.client_indices[2][4], s.client_indices[2][4])


def test_split_mnist_rejects_overlapping_tasks(mnist: Dataset) -> None:
    with pytest.raises(ValueError, match="disjoint"):
        split_mnist(2, data=mnist, task_classes=((0, 1), (1, 2)))
    with pytest.raises(ValueError, match="outside"):
        split_mnist(2, data=mnist, task_classes=((0, 10),))
    with pytest.raises(ValueError, match="fewer than"):
        split_mnist(900, data=mnist)


def test_permuted_mnist_permutations(mnist: Dataset) -> None:
    s = permuted_mnist(4, seed=3, num_tasks=3, data=mnist)
    perms = pixel_permutations(784, 3, seed=3)
    assert np.array_equal(perms[0], np.arange(784))  # task 0 is plain MNIST
    assert sorted(perms[1].tolist()) == list(range(784))
    assert not np.array_equal(perms[1], perms[2])
    assert np.array_equal(perms, pixel_permutations(784, 3, seed=3))
    assert not np.array_equal(perms[1], pixel_permutations(784, 3, seed=4)[1])
    ix = s.client_indices[0][1]
    assert len(ix) == 1000  # all 4000 images per task, over 4 clients
    e0, e1 = s.client_experience(0, 0), s.client_experience(0, 1)
    raw = mnist.x_train[s.client_indices[0][0]].reshape(-1, 784)
    assert np.array_equal(e0.x.numpy().reshape(-1, 784), raw)
    expected = mnist.x_train[ix].reshape(-1, 784)[:, perms[1]]
    assert np.array_equal(e1.x.numpy().reshape(-1, 784), expected)
    assert len(s.test_set(2)) == 1000 and s.setting == "domain-incremental"
    for t in range(3):
        assert_partition(s, t)


def test_rotated_mnist_angles(mnist: Dataset) -> None:
    s = rotated_mnist(2, seed=0, angles=(0, 30, 90), data=mnist)
    ix = s.client_indices[1][2]
    raw = mnist.x_train[ix]
    assert np.array_equal(
        s.client_experience(1, 0).x.numpy(), mnist.x_train[s.client_indices[1][0]]
    )
    assert np.array_equal(s.client_experience(1, 2).x.numpy(), np.rot90(raw, 1, axes=(2, 3)))
    r30 = s.client_experience(1, 1).x.numpy()
    assert r30.shape == (2000, 1, 28, 28) and not np.allclose(r30, mnist.x_train[ix])


def test_rotation_direction_is_consistent() -> None:
    # The exact rot90 path and the interpolating affine path agree on direction:
    # rotating by 89.99 degrees is (almost) the same image as rotating by 90.
    x = np.zeros((1, 1, 6, 6), dtype=np.float32)
    x[0, 0, 1, 4] = 1.0
    assert np.allclose(rotate_images(x, 89.99), rotate_images(x, 90.0), atol=1e-2)
    assert np.allclose(rotate_images(x, 0.001), x, atol=1e-3)
    with pytest.raises(ValueError, match="N, C, H, W"):
        rotate_images(np.zeros((2, 3)), 30.0)


def test_hospital_shift_only_after_boundary(cancer: Dataset) -> None:
    s = hospital_stream(3, seed=0, num_experiences=4, shift_from=2, data=cancer)
    assert [len(p) for p in s.train_pools] == [114, 114, 114, 113]  # 455 in 4 time chunks
    all_train = np.concatenate(s.train_pools)
    assert np.array_equal(np.sort(all_train), np.arange(455))  # each patient once
    shift = s.transform
    assert isinstance(shift, CovariateShift) and shift.start == 2
    feats = shift.features
    assert len(feats) == 15  # half of 30 features
    others = np.setdiff1d(np.arange(30), feats)
    for t in range(4):
        assert_partition(s, t)
        ix = s.client_indices[2][t]
        raw = cancer.x_train[ix]
        x = s.client_experience(2, t).x.numpy()
        assert np.array_equal(x[:, others], raw[:, others])  # untouched features
        if t < 2:
            assert np.array_equal(x, raw)  # no shift before the boundary
        else:
            assert np.allclose(x[:, feats], raw[:, feats] * shift.scale + shift.offset)
            assert not np.allclose(x[:, feats], raw[:, feats])
    assert np.array_equal(s.test_set(1).x.numpy(), cancer.x_test)
    assert not np.array_equal(s.test_set(2).x.numpy(), cancer.x_test)
    with pytest.raises(ValueError, match="tabular"):
        hospital_stream(2, data=load_dataset("digits", 0))


def test_async_boundaries_deterministic_by_seed() -> None:
    b = async_boundaries(4, 3, rounds_per_task=5, max_delay=3, seed=7)
    assert b.shape == (4, 3)
    assert np.array_equal(b, async_boundaries(4, 3, 5, 3, seed=7))
    assert not np.array_equal(b, async_boundaries(4, 3, 5, 3, seed=8))
    assert (b[:, 0] == 1).all()  # everyone starts task 0 in round 1
    base = 1 + 5 * np.arange(3)
    assert ((b >= base) & (b <= base + 3)).all()
    assert (np.diff(b, axis=1) > 0).all()
    assert np.array_equal(sync_boundaries(2, 3, 4), [[1, 5, 9], [1, 5, 9]])
    with pytest.raises(ValueError, match="max_delay"):
        async_boundaries(2, 3, rounds_per_task=3, max_delay=3, seed=0)


def test_scenario_streams_follow_async_boundaries(mnist: Dataset) -> None:
    s = split_mnist(3, seed=0, data=mnist, rounds_per_task=4).with_async_arrival(4, 2, seed=5)
    k = 1
    stream = s.stream(k)
    assert stream.boundaries == tuple(s.boundary_round(k, t) for t in range(5))
    assert stream.advance_to_round(1) == [0]
    r1 = s.boundary_round(k, 1)
    assert stream.advance_to_round(r1 - 1) == []
    assert stream.advance_to_round(r1) == [1]
    assert stream.current().classes == (2, 3)
    rounds = {s.boundary_round(c, 1) for c in range(3)}
    assert rounds <= {5, 6, 7}
    with pytest.raises(IndexError, match="client 3"):
        s.boundary_round(3, 0)


def test_make_scenario_registry(cancer: Dataset) -> None:
    assert set(SCENARIOS) == {"split-mnist", "permuted-mnist", "rotated-mnist", "hospital"}
    s = make_scenario("hospital", 2, seed=1, rounds_per_task=3, async_max_delay=2, data=cancer)
    assert np.array_equal(s.boundaries, async_boundaries(2, 4, 3, 2, seed=1))
    with pytest.raises(ValueError, match="unknown scenario"):
        make_scenario("split-cifar", 2)


def test_loads_shipped_data_by_name() -> None:
    # Without ``data=`` a scenario resolves its dataset through tasks.datasets.load_dataset.
    s = make_scenario("hospital", 2, seed=0)
    assert s.input_shape == (30,) and sum(len(p) for p in s.train_pools) == 455


def run_split_digits(replay_capacity: int) -> tuple[dict[str, float], list[float | None]]:
    """A tiny class-incremental run: stream -> drift boundaries -> policy -> replay -> metrics."""
    from strategies.continual.drift import DriftConfig, DriftMonitor
    from strategies.continual.metrics import AccuracyMatrix
    from strategies.continual.policy import RegrowthPolicy
    from strategies.continual.replay import ReservoirBuffer

    digits = load_dataset("digits", seed=0)
    s = split_mnist(2, seed=0, data=digits, rounds_per_task=2)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    monitor, policy = DriftMonitor(DriftConfig(grace_period=5)), RegrowthPolicy()
    buffer, gen = ReservoirBuffer(replay_capacity, seed=0), torch.Generator().manual_seed(0)
    acc = AccuracyMatrix(s.num_tasks)

    def accuracy(task: int) -> float:
        t = s.test_set(task)
        with torch.no_grad():
            return float((model(t.x).argmax(1) == t.y).float().mean())

    for j in range(s.num_tasks):
        acc.record_baseline(j, accuracy(j))
    stream, budgets = s.stream(0), []
    for rnd in range(1, 2 * s.num_tasks + 1):
        for task in stream.advance_to_round(rnd):
            budgets.append(policy.budget(monitor.task_boundary(task)))
        exp = stream.current()
        for _ in range(30):
            x, y = buffer.mix(exp.x, exp.y, 64, gen)
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            monitor.update(loss.item(), False)
        buffer.add(exp.x, exp.y)
        if rnd % 2 == 0:  # last round of the task: evaluate every task's test set
            for j in range(s.num_tasks):
                acc.record(stream.position, j, accuracy(j))
    assert acc.r[0, 0] > 0.9
    return acc.summary(), budgets


def test_continual_pieces_wire_together_on_split_digits() -> None:
    plain, budgets = run_split_digits(replay_capacity=0)
    assert budgets == [0.3] * 5  # one task-boundary budget per experience
    # Class-incremental plain SGD forgets catastrophically, in both definitions.
    assert plain["forgetting_avalanche"] > 0.5
    assert plain["forgetting_chaudhry"] >= plain["forgetting_avalanche"]
    replay, _ = run_split_digits(replay_capacity=200)
    assert replay["forgetting_avalanche"] < plain["forgetting_avalanche"] - 0.2
    assert replay["acc"] > plain["acc"]
