"""`leanfed deploy check-data`: a site's file checked against the run before it joins."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from client.sitecheck import SiteDataError, check_site_data
from simulations.cli import app
from tasks.config import LeanfedConfig
from tasks.datasets import load_dataset

CFG = LeanfedConfig(dataset="digits", model="mlp")
SECRET = 4242.125  # a "patient value" that must never reach the terminal


@pytest.fixture(scope="module")
def digits_shape() -> tuple[int, ...]:
    return tuple(load_dataset("digits").input_shape)


def _npz(path: Path, x: np.ndarray, y: np.ndarray) -> Path:
    np.savez(path, x=x, y=y)
    return path


def _site(tmp_path: Path, shape: tuple[int, ...], labels: np.ndarray) -> Path:
    x = np.zeros((len(labels), *shape), dtype=np.float32)
    x[0].flat[0] = SECRET
    return _npz(tmp_path / "site.npz", x, labels)


def test_good_file_reports_counts(tmp_path: Path, digits_shape: tuple[int, ...]) -> None:
    labels = np.repeat(np.arange(8), 5)  # classes 8 and 9 missing
    report = check_site_data(_site(tmp_path, digits_shape, labels), CFG)
    assert (report.train_examples, report.test_examples) == (32, 8)
    assert report.num_classes == 10 and sum(report.class_counts) == 32
    assert report.missing_classes == [8, 9]


@pytest.mark.parametrize(
    ("make", "needle"),
    [
        (lambda s: (np.zeros((20, 3)), np.arange(20) % 2), "have shape (3,)"),
        (lambda s: (np.zeros((20, *s)), np.arange(20) % 11), "labels are >= 10"),
        (lambda s: (np.zeros((20, *s)), np.zeros(20)), "single class"),
        (lambda s: (np.zeros((20, *s)), np.arange(20) % 2 - 0.5), "non-negative integers"),
        (lambda s: (np.full((20, *s), np.nan), np.arange(20) % 2), "NaN"),
    ],
)
def test_bad_files_refused_in_one_line(
    tmp_path: Path, digits_shape: tuple[int, ...], make: object, needle: str
) -> None:
    x, y = make(digits_shape)  # type: ignore[operator]
    path = _npz(tmp_path / "bad.npz", x, y)
    with pytest.raises(Exception, match=None) as err:
        check_site_data(path, CFG)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_declared_size_and_object_arrays_refused_before_loading(
    tmp_path: Path, digits_shape: tuple[int, ...]
) -> None:
    path = _site(tmp_path, digits_shape, np.arange(40) % 10)
    with pytest.raises(SiteDataError, match="above the"):
        check_site_data(path, CFG, max_bytes=1000)
    obj = tmp_path / "obj.npz"
    np.savez(obj, x=np.array([{"a": 1}] * 4, dtype=object), y=np.arange(4))
    with pytest.raises(SiteDataError, match="Python objects"):
        check_site_data(obj, CFG)


def test_cli_check_data(tmp_path: Path, digits_shape: tuple[int, ...]) -> None:
    conf = tmp_path / "run.toml"
    conf.write_text('dataset = "digits"\nmodel = "mlp"\n')
    runner = CliRunner()
    good = _site(tmp_path, digits_shape, np.repeat(np.arange(9), 4))
    res = runner.invoke(app, ["deploy", "check-data", str(good), "--config", str(conf)])
    assert res.exit_code == 0 and "9 of 10 present" in res.output, res.output
    assert "ok: this file can join" in res.output and str(SECRET) not in res.output
    args = ["deploy", "check-data", str(good), "--config", str(conf), "--require-all-classes"]
    res = runner.invoke(app, args)
    assert res.exit_code == 1 and "classes [9] have no training examples" in res.output
    bad = _npz(tmp_path / "bad.npz", np.full((20, 3), SECRET), np.arange(20) % 2)
    res = runner.invoke(app, ["deploy", "check-data", str(bad), "--config", str(conf)])
    assert res.exit_code == 1, res.output
    assert len(res.output.strip().splitlines()) == 1 and str(SECRET) not in res.output
    assert "Traceback" not in res.output
