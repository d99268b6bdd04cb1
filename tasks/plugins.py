"""The run's plug-ins (model, dataset, scenario, rules) built from the config, and checked up front.

`check_plugins` runs inside ``LeanfedConfig.from_run_config``: every name resolves and its
``<section>.options.*`` bind to its factory's signature before round 1, on every path
(``leanfed simulate``, ``flwr run``, a deployed SuperNode), or a one-line ConfigError says
which key is wrong. Nothing here loads data or builds a model.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable
from typing import Any

import torch

from strategies.aggregation.merge import MergeOptions
from strategies.aggregation.rules import MERGE_RULES, build_rule, build_vote
from strategies.plugins import PluginError, check_options
from strategies.sparse.rules import DST_RULES
from tasks.config import RULES, ConfigError, LeanfedConfig, OptionValue
from tasks.datasets import (
    DATASET_REGISTRY,
    USER_PREFIXES,
    Dataset,
    hold_out_validation,
    load_csv,
    load_dataset,
    load_npz,
)
from tasks.models import MODEL_REGISTRY, build_model
from tasks.scenarios import SCENARIO_REGISTRY

Options = tuple[tuple[str, OptionValue], ...]  # hashable, for per-process caches


def frozen_options(cfg: LeanfedConfig, section: str) -> Options:
    return tuple(sorted(cfg.options(section).items()))


def run_dataset(cfg: LeanfedConfig, loader: Callable[..., Dataset] = load_dataset) -> Dataset:
    """The run's dataset with its ``dataset.options.*`` (``loader``: a caching wrapper);
    with ``validation-size`` > 0, its validation split stands in for the test set."""
    ds = loader(cfg.dataset, cfg.seed, frozen_options(cfg, "dataset"))
    return hold_out_validation(ds, cfg.validation_size, cfg.seed)


def site_options(cfg: LeanfedConfig, kind: str) -> dict[str, OptionValue]:
    """A site's own csv/npz file is read with the run's ``dataset.options.*`` (delimiter,
    label column) when the run's dataset is a file of the same kind, else with defaults."""
    return cfg.options("dataset") if cfg.dataset.startswith(f"{kind}:") else {}


def run_model(
    cfg: LeanfedConfig, input_shape: tuple[int, ...], num_classes: int
) -> torch.nn.Module:
    """The run's model (``model`` + ``model.options.*``), seeded with the run's seed."""
    return build_model(
        cfg.model, input_shape, num_classes, seed=cfg.seed, options=cfg.options("model")
    )


def check_plugins(cfg: LeanfedConfig) -> None:
    """Resolve every plug-in the config names and bind its options; ConfigError if one fails."""
    try:
        _check(cfg)
    except PluginError as exc:
        raise ConfigError(str(exc)) from None


def _check(cfg: LeanfedConfig) -> None:
    model_opts = cfg.options("model")
    if cfg.model == "auto":
        if model_opts:
            raise PluginError("model.options.* need an explicit model (model = 'auto' picks one)")
    else:
        check_options(MODEL_REGISTRY.resolve(cfg.model), 3, model_opts, "model.options")
    data_opts: dict[str, Any] = dict(cfg.options("dataset"))
    if cfg.dataset.startswith(USER_PREFIXES):
        loader = load_csv if cfg.dataset.startswith("csv:") else load_npz
        check_options(loader, 1, {**data_opts, "seed": cfg.seed}, "dataset.options")
    else:
        check_options(DATASET_REGISTRY.resolve(cfg.dataset), 1, data_opts, "dataset.options")
    cl_opts: dict[str, Any] = dict(cfg.options("cl"))
    if cfg.cl_scenario != "none":
        factory = SCENARIO_REGISTRY.resolve(cfg.cl_scenario)
        check_options(factory, 2, {"rounds_per_task": 1, "data": None, **cl_opts}, "cl.options")
    elif cl_opts:
        raise PluginError("cl.options.* need a continual scenario (cl.scenario is 'none')")
    if cfg.dst_rule not in RULES:
        DST_RULES.resolve(cfg.dst_rule)
    elif cfg.options("dst"):
        raise PluginError(f"dst.options.* apply to a plug-in dst.rule, not {cfg.dst_rule!r}")
    if cfg.strategy == "sparse":
        build_rule(cfg.aggregation_rule, rule_options(cfg), merge_options(cfg))
    build_vote(cfg.aggregation_vote)


def merge_options(cfg: LeanfedConfig) -> MergeOptions:
    """The knobs of the built-in (robust) rules: aggregation.trim, .num-malicious, ..."""
    return MergeOptions(
        trim=cfg.aggregation_trim,
        num_malicious=cfg.aggregation_num_malicious,
        min_support=cfg.aggregation_min_support,
        clip_norm=cfg.aggregation_clip_norm,
        krum_select=cfg.aggregation_krum_select,
    )


def rule_options(cfg: LeanfedConfig) -> dict[str, OptionValue]:
    """``aggregation.options.*``; a rule option ``client-learning-rate`` (q-FedAvg) defaults
    to local.lr."""
    options = cfg.options("aggregation")
    rule = MERGE_RULES.resolve(cfg.aggregation_rule)
    with contextlib.suppress(TypeError, ValueError):
        if "client_learning_rate" in inspect.signature(rule).parameters:
            options.setdefault("client-learning-rate", cfg.local_lr)
    return options
