"""Site onboarding: check a site's data file against a run's config before the site joins.

Runs at the site, with the loader the ClientApp itself uses (``tasks.datasets`` via
``npz:``/``csv:``), so a file that passes here is a file the ClientApp can train on. An NPZ's
array headers are read first (shape, dtype, declared size) so that a huge or hostile file is
refused before anything is allocated. Messages name what was wrong, never a value.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tasks.config import LeanfedConfig
from tasks.datasets import Dataset, DatasetError, load_dataset
from tasks.plugins import run_dataset, site_options

DEFAULT_MAX_BYTES = 2 * 1024**3  # 2 GiB of arrays: far above any site file leanfed expects


class SiteDataError(DatasetError):
    """The site's file cannot join this run (wrong shape, labels, classes, size)."""


@dataclass(frozen=True)
class SiteDataReport:
    """What the check found: counts and shapes only, never values."""

    path: Path
    train_examples: int
    test_examples: int
    input_shape: tuple[int, ...]
    num_classes: int  # the run's
    class_counts: list[int] = field(default_factory=list)  # training examples per class

    @property
    def missing_classes(self) -> list[int]:
        return [k for k, n in enumerate(self.class_counts) if n == 0]


def _npz_headers(path: Path, max_bytes: int) -> None:
    """Refuse object arrays and oversized declared shapes before ``np.load`` allocates."""
    total = 0
    try:
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                if not info.filename.endswith(".npy"):
                    continue
                with zf.open(info) as fh:
                    version = np.lib.format.read_magic(fh)
                    if version == (1, 0):
                        shape, _, dtype = np.lib.format.read_array_header_1_0(fh)
                    else:
                        shape, _, dtype = np.lib.format.read_array_header_2_0(fh)
                key = info.filename.removesuffix(".npy")
                if dtype.hasobject:
                    raise SiteDataError(f"{path}: array {key!r} holds Python objects, not numbers")
                total += int(np.prod(shape, dtype=np.float64)) * dtype.itemsize
    except SiteDataError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise SiteDataError(f"{path}: not a readable .npz archive ({type(exc).__name__})") from None
    if total > max_bytes:
        raise SiteDataError(
            f"{path}: arrays declare {total / 1e9:.1f} GB, above the {max_bytes / 1e9:.1f} GB limit"
        )


def check_site_data(
    path: Path | str, cfg: LeanfedConfig, *, max_bytes: int = DEFAULT_MAX_BYTES
) -> SiteDataReport:
    """Validate ``path`` for a run of ``cfg``; SiteDataError (one line) when it cannot join."""
    p = Path(path)
    if not p.is_file():
        raise SiteDataError(f"{p}: no such file")
    kind = "csv" if p.suffix.lower() == ".csv" else "npz"
    if kind == "npz":
        _npz_headers(p, max_bytes)
    elif p.stat().st_size > max_bytes:
        raise SiteDataError(f"{p}: {p.stat().st_size / 1e9:.1f} GB is above the size limit")
    # The ClientApp's own loader (with the run's csv/npz options when the run uses that kind).
    site: Dataset = load_dataset(f"{kind}:{p}", seed=cfg.seed, options=site_options(cfg, kind))
    reference = run_dataset(cfg)  # what the server builds the model for
    if tuple(site.input_shape) != tuple(reference.input_shape):
        raise SiteDataError(
            f"{p}: examples have shape {tuple(site.input_shape)}, the run's dataset "
            f"{cfg.dataset!r} has {tuple(reference.input_shape)}"
        )
    k = reference.num_classes
    for name, y in (("training", site.y_train), ("test", site.y_test)):
        if y.size and int(y.max()) >= k:
            raise SiteDataError(
                f"{p}: {int((y >= k).sum())} {name} labels are >= {k}, the run's number of "
                f"classes (labels must be 0..{k - 1})"
            )
    counts = np.bincount(site.y_train, minlength=k).tolist()
    report = SiteDataReport(
        p, len(site.y_train), len(site.y_test), tuple(site.input_shape), k, counts
    )
    if sum(1 for n in counts if n) < 2:
        raise SiteDataError(f"{p}: training data covers a single class; it cannot train a model")
    return report
