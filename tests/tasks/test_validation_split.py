"""The validation split (``validation-size``): carved from the training set, never the test set."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from client.data import local_data
from tasks.config import ConfigError, LeanfedConfig
from tasks.datasets import Dataset, DatasetError, hold_out_validation, load_dataset
from tasks.plugins import run_dataset


def tagged(n_train: int, n_test: int, classes: int = 3) -> Dataset:
    """Each example's one feature is its id (train 0..n-1, test n..): splits are traceable."""
    ids = np.arange(n_train + n_test, dtype=np.float32).reshape(-1, 1)
    y = (np.arange(n_train + n_test) % classes).astype(np.int64)
    return Dataset("tagged", ids[:n_train], y[:n_train], ids[n_train:], y[n_train:], classes, (1,))


@settings(max_examples=40, deadline=None)
@given(n=st.integers(6, 60), size=st.integers(1, 59), seed=st.integers(0, 3))
def test_split_is_disjoint_exact_and_leaves_the_test_set_out(n: int, size: int, seed: int) -> None:
    if size >= n:
        size = n - 1
    ds = tagged(n, 7)
    out = hold_out_validation(ds, size, seed)
    train = set(out.x_train[:, 0].tolist())
    val = set(out.x_test[:, 0].tolist())
    assert len(out.y_test) == size and len(out.y_train) == n - size
    assert train.isdisjoint(val)
    assert train | val == set(range(n))  # exactly the old training set, no test example
    assert out.y_train.tolist() == [int(i) % 3 for i in out.x_train[:, 0]]  # labels follow
    assert out.y_test.tolist() == [int(i) % 3 for i in out.x_test[:, 0]]
    assert sorted(out.x_train[:, 0].tolist()) == out.x_train[:, 0].tolist()  # order kept


def test_mnist5k_validation_is_stratified_and_seeded() -> None:
    ds = load_dataset("mnist5k", seed=0)
    out = hold_out_validation(ds, 400, 0)
    assert np.bincount(out.y_test).tolist() == [40] * 10
    assert np.bincount(out.y_train).tolist() == [360] * 10
    again = hold_out_validation(ds, 400, 0)
    np.testing.assert_array_equal(again.x_test, out.x_test)
    assert hold_out_validation(ds, 0, 0) is ds


@pytest.mark.parametrize("size", [-1, 10, 11])
def test_out_of_range_sizes_are_one_line_errors(size: int) -> None:
    with pytest.raises(DatasetError, match="validation-size") as err:
        hold_out_validation(tagged(10, 2), size, 0)
    assert "\n" not in str(err.value)


def test_config_rejects_a_negative_size() -> None:
    with pytest.raises(ConfigError, match="validation-size"):
        LeanfedConfig.from_run_config({"validation-size": -3}, check_plugins=False)


def test_server_evaluates_on_it_and_clients_train_on_the_rest() -> None:
    cfg = LeanfedConfig(dataset="digits", num_partitions=4, partition_scheme="iid")
    cfg = cfg.replace(validation_size=100)
    server = run_dataset(cfg)  # what the server evaluates on (its x_test)
    full = load_dataset("digits", seed=0)
    assert len(server.y_test) == 100 and len(server.y_train) == len(full.y_train) - 100
    sites = [local_data(cfg, {"partition-id": i, "num-partitions": 4}) for i in range(4)]
    assert sum(len(s.y) for s in sites) == len(server.y_train)
    # the sites' examples are exactly the server's training rows (validation rows are not)
    rows = sorted(r for s in sites for r in s.x.flatten(1).tolist())
    assert rows == sorted(torch.as_tensor(server.x_train).flatten(1).tolist())
