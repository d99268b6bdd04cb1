"""Continual-learning scenarios on shipped data, split over K clients, with per-task test sets.

Scenarios follow the three standard CL settings (van de Ven & Tolias 2019, "Three
scenarios for continual learning") and Avalanche's benchmark generators:

- ``split-mnist``: class-incremental Split-MNIST on mnist5k, 5 tasks of 2 digits
  {0,1},{2,3},...,{8,9}; single head over the 10 original labels.
- ``permuted-mnist``: domain-incremental; task 0 is the original images, task t >= 1 a
  seeded fixed pixel permutation (Goodfellow et al. 2013; Kirkpatrick et al. 2017).
- ``rotated-mnist``: domain-incremental; task t rotates every image by angles[t] degrees
  (Lopez-Paz & Ranzato 2017) with an affine grid (torch only, no torchvision);
  multiples of 90 use the exact ``torch.rot90``.
- ``hospital``: tabular breast-cancer stream split over sites in time order; from
  experience ``shift_from`` on, a seeded covariate shift (per-feature scale and offset)
  hits half of the features: a new scanner / lab protocol mid-stream.

The split over clients, the task boundaries and the ``Scenario`` record itself are
``tasks.scenario_base``; every name callers imported from this module is re-exported.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from strategies.plugins import PluginError, Registry, check_options, option_kwargs
from tasks.scenario_base import (
    DatasetLike,
    Scenario,
    Transform,
    async_boundaries,
    build_scenario,
    load_data,
    split_indices,
    sync_boundaries,
)

__all__ = [
    "SCENARIOS",
    "SCENARIO_REGISTRY",
    "CovariateShift",
    "DatasetLike",
    "Scenario",
    "ScenarioFactory",
    "Transform",
    "async_boundaries",
    "hospital_stream",
    "make_covariate_shift",
    "make_scenario",
    "permuted_mnist",
    "pixel_permutations",
    "rotate_images",
    "rotated_mnist",
    "split_indices",
    "split_mnist",
    "sync_boundaries",
]


# -- class-incremental -----------------------------------------------------------------


def split_mnist(
    num_clients: int,
    seed: int = 0,
    *,
    dataset: str = "mnist5k",
    task_classes: Sequence[Sequence[int]] = ((0, 1), (2, 3), (4, 5), (6, 7), (8, 9)),
    rounds_per_task: int = 1,
    data: DatasetLike | None = None,
) -> Scenario:
    """Class-incremental: task t holds exactly the examples whose label is in task_classes[t]."""
    data = load_data(dataset, seed) if data is None else data
    flat = [c for cs in task_classes for c in cs]
    if len(set(flat)) != len(flat):
        raise ValueError(f"task_classes must be disjoint, got {task_classes}")
    if any(not 0 <= c < data.num_classes for c in flat):
        raise ValueError(f"task_classes {task_classes} outside 0..{data.num_classes - 1}")
    train = [np.flatnonzero(np.isin(data.y_train, cs)) for cs in task_classes]
    test = [np.flatnonzero(np.isin(data.y_test, cs)) for cs in task_classes]
    return build_scenario(
        "split-mnist",
        "class-incremental",
        data,
        task_classes,
        train,
        test,
        num_clients,
        seed,
        rounds_per_task,
    )


# -- domain-incremental ----------------------------------------------------------------


def _all_classes(data: DatasetLike, num_tasks: int) -> list[tuple[int, ...]]:
    return [tuple(range(data.num_classes))] * num_tasks


def pixel_permutations(num_features: int, num_tasks: int, seed: int) -> np.ndarray:
    """[T, F] permutations: row 0 the identity, row t >= 1 seeded by (seed, t)."""
    rows = [np.arange(num_features)]
    rows += [
        np.random.default_rng([seed, 0x9E, t]).permutation(num_features)
        for t in range(1, num_tasks)
    ]
    return np.stack(rows)


def permuted_mnist(
    num_clients: int,
    seed: int = 0,
    *,
    num_tasks: int = 4,
    dataset: str = "mnist5k",
    rounds_per_task: int = 1,
    data: DatasetLike | None = None,
) -> Scenario:
    """Domain-incremental: every task uses all images, task t permutes pixels with perms[t]."""
    if num_tasks < 1:
        raise ValueError(f"num_tasks must be >= 1, got {num_tasks}")
    data = load_data(dataset, seed) if data is None else data
    shape = tuple(data.input_shape)
    perms = pixel_permutations(math.prod(shape), num_tasks, seed)

    def permute(task: int, x: np.ndarray) -> np.ndarray:
        flat = x.reshape(x.shape[0], -1)  # [N, F]
        return flat[:, perms[task]].reshape(x.shape)

    train = [np.arange(len(data.y_train))] * num_tasks
    test = [np.arange(len(data.y_test))] * num_tasks
    return build_scenario(
        "permuted-mnist",
        "domain-incremental",
        data,
        _all_classes(data, num_tasks),
        train,
        test,
        num_clients,
        seed,
        rounds_per_task,
        permute,
    )


def rotate_images(x: np.ndarray, degrees: float) -> np.ndarray:
    """Rotate [N, C, H, W] images counter-clockwise by ``degrees`` (bilinear, zero fill).

    Multiples of 90 use torch.rot90 (exact, no interpolation); others an affine grid:
    output pixel at normalised (u, v) samples input at R(theta) (u, v).
    """
    if x.ndim != 4:
        raise ValueError(f"rotate_images needs [N, C, H, W], got shape {x.shape}")
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    if degrees % 90 == 0:
        return torch.rot90(t, int(degrees // 90) % 4, dims=(-2, -1)).numpy()
    a = math.radians(degrees)
    theta = torch.tensor(
        [[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0]], dtype=torch.float32
    ).expand(t.shape[0], 2, 3)  # [N, 2, 3]
    grid = F.affine_grid(theta, list(t.shape), align_corners=False)  # [N, H, W, 2]
    out = F.grid_sample(t, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out.numpy()


def rotated_mnist(
    num_clients: int,
    seed: int = 0,
    *,
    angles: Sequence[float] = (0.0, 30.0, 60.0, 90.0),
    dataset: str = "mnist5k",
    rounds_per_task: int = 1,
    data: DatasetLike | None = None,
) -> Scenario:
    """Domain-incremental: task t shows every image rotated by angles[t] degrees."""
    if not angles:
        raise ValueError("rotated_mnist needs at least one angle")
    data = load_data(dataset, seed) if data is None else data
    if len(tuple(data.input_shape)) != 3:
        raise ValueError(f"rotated_mnist needs image inputs (C, H, W), got {data.input_shape}")
    angle_list = [float(a) for a in angles]

    def rotate(task: int, x: np.ndarray) -> np.ndarray:
        return rotate_images(x, angle_list[task])

    n = len(angle_list)
    train = [np.arange(len(data.y_train))] * n
    test = [np.arange(len(data.y_test))] * n
    return build_scenario(
        "rotated-mnist",
        "domain-incremental",
        data,
        _all_classes(data, n),
        train,
        test,
        num_clients,
        seed,
        rounds_per_task,
        rotate,
    )


@dataclass(frozen=True, eq=False)
class CovariateShift:
    """x[:, features] -> x[:, features] * scale + offset, applied from task ``start`` on."""

    start: int
    features: np.ndarray  # [M] feature indices (sorted)
    scale: np.ndarray  # [M]
    offset: np.ndarray  # [M]

    def __call__(self, task: int, x: np.ndarray) -> np.ndarray:
        if task < self.start:
            return x
        out = np.array(x, dtype=np.float32, copy=True)
        out[:, self.features] = out[:, self.features] * self.scale + self.offset
        return out


def make_covariate_shift(
    num_features: int, start: int, fraction: float, magnitude: float, seed: int
) -> CovariateShift:
    """Seeded shift of round(fraction * F) features: scale = exp(N(0, 0.25 m)), offset ~ N(0, m)."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"shift fraction must be in (0, 1], got {fraction}")
    rng = np.random.default_rng([seed, 0xC5])
    m = max(1, round(fraction * num_features))
    feats = np.sort(rng.choice(num_features, size=m, replace=False))
    scale = np.exp(rng.normal(0.0, 0.25 * magnitude, size=m)).astype(np.float32)
    offset = rng.normal(0.0, magnitude, size=m).astype(np.float32)
    return CovariateShift(start, feats, scale, offset)


def hospital_stream(
    num_clients: int,
    seed: int = 0,
    *,
    num_experiences: int = 4,
    shift_from: int = 2,
    shift_fraction: float = 0.5,
    shift_magnitude: float = 1.0,
    dataset: str = "breast_cancer",
    rounds_per_task: int = 1,
    data: DatasetLike | None = None,
) -> Scenario:
    """Sites see disjoint time-ordered chunks of patients; covariates shift from shift_from on.

    The training set is cut into ``num_experiences`` consecutive chunks of a seeded
    permutation (patients arriving over time), each chunk split over the sites. Every
    experience is tested on the whole test set under that experience's covariates, so a
    column j >= shift_from measures accuracy on the shifted population.
    """
    if num_experiences < 1:
        raise ValueError(f"num_experiences must be >= 1, got {num_experiences}")
    if not 0 <= shift_from <= num_experiences:
        raise ValueError(f"shift_from must be in [0, {num_experiences}], got {shift_from}")
    data = load_data(dataset, seed) if data is None else data
    if len(tuple(data.input_shape)) != 1:
        raise ValueError(f"hospital_stream needs tabular inputs (F,), got {data.input_shape}")
    shift = make_covariate_shift(
        int(data.input_shape[0]), shift_from, shift_fraction, shift_magnitude, seed
    )
    order = np.random.default_rng([seed, 0x40]).permutation(len(data.y_train))
    train = [np.sort(c) for c in np.array_split(order, num_experiences)]
    test = [np.arange(len(data.y_test))] * num_experiences
    return build_scenario(
        "hospital",
        "domain-incremental",
        data,
        _all_classes(data, num_experiences),
        train,
        test,
        num_clients,
        seed,
        rounds_per_task,
        shift,
    )


# A scenario factory: (num_clients, seed, *, rounds_per_task, data, **options) -> a Scenario
# (or any object with num_tasks, num_classes, input_shape, stream(client), test_set(task)).
# ``data`` is the run's dataset (config ``dataset``); ``options`` come from cl.options.*.
ScenarioFactory = Callable[..., Scenario]
SCENARIO_REGISTRY: Registry[ScenarioFactory] = Registry(
    "scenario", "leanfed.scenarios", "cl.scenario"
)
for _name, _factory in (
    ("split-mnist", split_mnist),
    ("permuted-mnist", permuted_mnist),
    ("rotated-mnist", rotated_mnist),
    ("hospital", hospital_stream),
):
    SCENARIO_REGISTRY.register(_name, _factory)
SCENARIOS: dict[str, ScenarioFactory] = {
    n: SCENARIO_REGISTRY.resolve(n) for n in SCENARIO_REGISTRY.builtin_names()
}


def make_scenario(
    name: str,
    num_clients: int,
    seed: int = 0,
    *,
    rounds_per_task: int = 1,
    async_max_delay: int = 0,
    **kwargs: object,
) -> Scenario:
    """Build a named scenario (built-in, entry point or "module:factory"); ``kwargs`` go to
    the factory (``data``, cl.options.*); ``async_max_delay > 0`` adds seeded async arrival."""
    factory = SCENARIO_REGISTRY.resolve(name)
    check_options(factory, 2, {"rounds_per_task": rounds_per_task, **kwargs}, "cl.options")
    scenario = factory(num_clients, seed, rounds_per_task=rounds_per_task, **option_kwargs(kwargs))
    for attr in ("num_tasks", "num_classes", "input_shape", "stream", "test_set"):
        if not hasattr(scenario, attr):
            raise PluginError(f"cl.scenario = {name!r}: the factory's result has no {attr!r}")
    if async_max_delay > 0:
        if not hasattr(scenario, "with_async_arrival"):
            raise PluginError(f"cl.scenario = {name!r} does not support cl.async-max-delay")
        scenario = scenario.with_async_arrival(rounds_per_task, async_max_delay, seed)
    return scenario
