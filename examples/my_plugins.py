"""README "Bring your own": a user's model, dataset and continual stream, named from the run config.

Run config (or a TOML override file):

    model = "examples.my_plugins:tiny_net"
    "model.options.hidden" = 32
    dataset = "examples.my_plugins:blobs"
    cl.scenario = "examples.my_plugins:two_phase_stream"
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
from torch import nn

from tasks.scenarios import split_mnist


def tiny_net(
    input_shape: tuple[int, ...], num_classes: int, seed: int, hidden: int = 32
) -> nn.Module:
    """Any nn.Module: leanfed seeds torch with ``seed`` before calling this."""
    n_in = int(np.prod(input_shape))
    return nn.Sequential(
        nn.Flatten(), nn.Linear(n_in, hidden), nn.ReLU(), nn.Linear(hidden, num_classes)
    )


def blobs(seed: int, n: int = 600, features: int = 16, classes: int = 4) -> SimpleNamespace:
    """Gaussian blobs: any object with x_train [N, *shape], y_train [N] (ints), x_test, y_test,
    num_classes and input_shape is a dataset; leanfed checks shapes and labels."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 3, size=(classes, features))
    y = rng.integers(0, classes, size=n)
    x = (centers[y] + rng.normal(0, 1, size=(n, features))).astype(np.float32)
    cut = int(0.8 * n)
    return SimpleNamespace(
        x_train=x[:cut],
        y_train=y[:cut],
        x_test=x[cut:],
        y_test=y[cut:],
        num_classes=classes,
        input_shape=(features,),
    )


def two_phase_stream(
    num_clients: int, seed: int, *, rounds_per_task: int, data: object, split: int = 2
) -> object:
    """A class-incremental stream over the run's dataset: classes < split, then the rest."""
    classes = int(data.num_classes)  # type: ignore[attr-defined]
    tasks = (tuple(range(split)), tuple(range(split, classes)))
    return split_mnist(
        num_clients, seed, task_classes=tasks, rounds_per_task=rounds_per_task, data=data
    )
