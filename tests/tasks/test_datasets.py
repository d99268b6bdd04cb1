from pathlib import Path

import numpy as np
import pytest

from tasks.datasets import DATASETS, Dataset, DatasetError, load_csv, load_dataset, load_npz


@pytest.fixture(scope="module")
def mnist() -> Dataset:
    return load_dataset("mnist5k", seed=0)


def test_mnist5k_exact_stratified_sizes(mnist: Dataset) -> None:
    assert mnist.x_train.shape == (4000, 1, 28, 28)
    assert mnist.x_test.shape == (1000, 1, 28, 28)
    assert mnist.input_shape == (1, 28, 28) and mnist.num_classes == 10
    assert np.bincount(mnist.y_train).tolist() == [400] * 10
    assert np.bincount(mnist.y_test).tolist() == [100] * 10
    assert mnist.x_train.dtype == np.float32 and mnist.y_train.dtype == np.int64
    assert mnist.x_train.min() == 0.0 and mnist.x_train.max() == 1.0


def test_mnist5k_shuffled_and_seeded(mnist: Dataset) -> None:
    # the packaged file is sorted by label; the first 50 training labels must be mixed
    assert len(np.unique(mnist.y_train[:50])) > 5
    again = load_dataset("mnist5k", seed=0)
    np.testing.assert_array_equal(again.x_train, mnist.x_train)
    np.testing.assert_array_equal(again.y_test, mnist.y_test)
    other = load_dataset("mnist5k", seed=1)
    assert not np.array_equal(other.y_train, mnist.y_train)
    assert np.bincount(other.y_test).tolist() == [100] * 10


def test_digits_and_breast_cancer() -> None:
    d = load_dataset("digits", seed=0)
    assert (len(d.y_train), len(d.y_test)) == (1437, 360)
    assert d.input_shape == (1, 8, 8) and d.x_train.shape[1:] == (1, 8, 8)
    assert d.x_train.min() >= 0.0 and d.x_train.max() <= 1.0
    b = load_dataset("breast_cancer", seed=0)
    assert (len(b.y_train), len(b.y_test)) == (455, 114)
    assert b.input_shape == (30,) and b.num_classes == 2
    # standardized with train statistics: train columns are exactly mean 0, std 1
    np.testing.assert_allclose(b.x_train.mean(axis=0), 0.0, atol=1e-5)
    np.testing.assert_allclose(b.x_train.std(axis=0), 1.0, atol=1e-4)
    # stratified: class ratios equal up to one example
    assert abs(np.mean(b.y_train) - np.mean(b.y_test)) < 0.01
    assert set(DATASETS) == {"mnist5k", "digits", "breast_cancer"}


def test_unknown_name() -> None:
    with pytest.raises(DatasetError, match="dataset = 'cifar': unknown dataset.*mnist5k"):
        load_dataset("cifar")


def _write_csv(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_csv_roundtrip(tmp_path: Path) -> None:
    rows = ["a,b,label"] + [f"{i},{2 * i},{i % 2}" for i in range(20)]
    p = _write_csv(tmp_path / "d.csv", "\n".join(rows) + "\n")
    ds = load_dataset(f"csv:{p}", seed=3)
    assert (len(ds.y_train), len(ds.y_test)) == (16, 4)
    assert ds.input_shape == (2,) and ds.num_classes == 2
    assert np.bincount(ds.y_test).tolist() == [2, 2]
    again = load_csv(p, seed=3)
    np.testing.assert_array_equal(again.x_train, ds.x_train)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("a,b,target\n1,2,0\n3,4,1\n", "no column named 'label' in the first row"),
        ("a,label\n1,0\nx,1\n", "non-numeric value at line 3, column 1 "),
        ("a,label\n1,0\n2\n", "line 3 has 1 fields, the header has 2"),
        ("a,label\n1,0.5\n2,1\n", "non-negative integers"),
        ("a,label\n1,0\n", "at least 2 data rows"),
        ("", "empty CSV"),
    ],
)
def test_csv_malformed(tmp_path: Path, text: str, match: str) -> None:
    p = _write_csv(tmp_path / "bad.csv", text)
    with pytest.raises(DatasetError, match=match) as info:
        load_dataset(f"csv:{p}")
    assert "bad.csv" in str(info.value)
    message = str(info.value).replace(str(p), "FILE")
    assert "'x'" not in message and "target" not in message  # no cell of the file is quoted


def test_csv_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"nope\.csv: CSV file not found.*'label' column"):
        load_dataset(f"csv:{tmp_path / 'nope.csv'}")


def test_npz_both_layouts(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(30, 1, 4, 4), dtype=np.uint8)
    y = np.arange(30) % 3
    np.savez(tmp_path / "xy.npz", x=x, y=y)
    ds = load_npz(tmp_path / "xy.npz", seed=0)
    assert (len(ds.y_train), len(ds.y_test)) == (24, 6)
    assert ds.input_shape == (1, 4, 4) and ds.num_classes == 3
    assert ds.x_train.dtype == np.float32 and ds.x_train.max() <= 1.0  # uint8 scaled by 1/255
    np.savez(tmp_path / "split.npz", x_train=x[:20], y_train=y[:20], x_test=x[20:], y_test=y[20:])
    ds2 = load_dataset(f"npz:{tmp_path / 'split.npz'}")
    assert (len(ds2.y_train), len(ds2.y_test)) == (20, 10)
    np.testing.assert_allclose(ds2.x_test[0], x[20] / 255.0, rtol=1e-6)


def test_npz_errors(tmp_path: Path) -> None:
    np.savez(tmp_path / "keys.npz", features=np.zeros((4, 2)), y=np.zeros(4))
    with pytest.raises(DatasetError, match="keys.npz: missing keys.*found features, y"):
        load_dataset(f"npz:{tmp_path / 'keys.npz'}")
    np.savez(tmp_path / "len.npz", x=np.zeros((5, 2)), y=np.zeros(4))
    with pytest.raises(DatasetError, match="mismatched lengths, x has 5 rows but y has 4"):
        load_dataset(f"npz:{tmp_path / 'len.npz'}")
    np.savez(
        tmp_path / "len2.npz",
        x_train=np.zeros((5, 2)), y_train=np.zeros(5), x_test=np.zeros((3, 2)), y_test=np.zeros(2),
    )
    with pytest.raises(DatasetError, match="x_test has 3 rows but y_test has 2"):
        load_dataset(f"npz:{tmp_path / 'len2.npz'}")
    np.savez(tmp_path / "nan.npz", x=np.full((4, 2), np.nan), y=np.zeros(4))
    with pytest.raises(DatasetError, match="x contains NaN"):
        load_dataset(f"npz:{tmp_path / 'nan.npz'}")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(DatasetError, match="junk.npz: not a readable .npz"):
        load_dataset(f"npz:{tmp_path / 'junk.npz'}")
    with pytest.raises(DatasetError, match="NPZ file not found"):
        load_dataset(f"npz:{tmp_path / 'missing.npz'}")
