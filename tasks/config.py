"""The frozen, validated run config; in tasks/ because the ServerApp and ClientApp both parse it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from typing import Any

from tasks.config_checks import (
    AVERAGES,
    BYZANTINE_RULES,
    CL_SCENARIOS,
    DISTRIBUTIONS,
    DRIFT_DETECTORS,
    DST_INITS,
    OPTIMIZERS,
    OPTION_SECTIONS,
    PARTITIONS,
    PRIVACY_MODES,
    RULES,
    SECURE_MODES,
    STRATEGIES,
    STRUCTURED_RULES,
    VALUE_DTYPES,
    VOTES,
    ConfigError,
    OptionValue,
    check_config,
    parse_overrides,
)

__all__ = [
    "AVERAGES",
    "BYZANTINE_RULES",
    "CL_SCENARIOS",
    "DISTRIBUTIONS",
    "DRIFT_DETECTORS",
    "DST_INITS",
    "OPTIMIZERS",
    "OPTION_SECTIONS",
    "PARTITIONS",
    "PRIVACY_MODES",
    "RULES",
    "SECURE_MODES",
    "STRATEGIES",
    "STRUCTURED_RULES",
    "VALUE_DTYPES",
    "VOTES",
    "ConfigError",
    "LeanfedConfig",
    "OptionValue",
]


@dataclass(frozen=True)
class LeanfedConfig:
    """Every knob of a run. Field names map to run-config keys: ``dst_rule`` <-> ``dst.rule``,
    ``num_server_rounds`` <-> ``num-server-rounds`` (first ``_`` after a known section is a dot)."""

    num_server_rounds: int = 5
    seed: int = 0
    strategy: str = "sparse"
    # sampling
    fraction_train: float = 0.5
    min_train_nodes: int = 2
    fraction_evaluate: float = 0.0
    # A round with fewer accepted train replies is marked degraded; a run with any such
    # round ends "degraded", one whose every round rejected every reply ends "failed".
    min_accepted_replies: int = 1
    # data
    dataset: str = "mnist5k"  # built-in name, csv:PATH, npz:PATH, entry point or module:factory
    model: str = "auto"  # "auto": CNN for images, MLP for tabular data; or any model plug-in
    partition_scheme: str = "dirichlet"
    partition_alpha: float = 0.5
    partition_shards: int = 2
    partition_sample_size: int = 16  # "sample": examples per client (clients may overlap)
    num_partitions: int = 10
    # Examples of the training set held out (stratified, seeded; before partitioning) and
    # evaluated on IN PLACE OF the test set, for tuning without touching the test set; 0 = off
    validation_size: int = 0
    # local training
    local_steps: int = 20
    local_batch_size: int = 32
    local_lr: float = 0.05
    local_optimizer: str = "sgd"
    local_momentum: float = 0.9
    local_weight_decay: float = 5e-4
    local_proximal_mu: float = 0.0  # FedProx (Li et al. 2020): + mu/2 ||w - w_global||^2
    # dynamic sparse training
    dst_rule: str = "rigl"
    dst_density: float = 0.1
    dst_distribution: str = "erk"
    dst_drop_fraction: float = 0.3
    dst_update_interval: int = 10
    dst_mask_round_interval: int = 1  # FedDST's ΔR: clients readjust masks every ΔR rounds
    dst_end_round_fraction: float = 0.8  # no mask readjustment in the last rounds
    dst_exclude: str = ""  # comma-separated fnmatch patterns of layers kept dense
    dst_density_overrides: str = ""  # "pattern=density,..." fixed densities per layer
    dst_erk_power_scale: float = 1.0  # ERK exponent (1 = RigL's ERK, 0 = uniform)
    dst_init: str = "random"  # initial server mask: "random" | "magnitude"
    # structured rules: clients train the physically smaller sub-network between mask rounds
    dst_condensed: bool = False
    # wire codec
    codec_upload_dtype: str = "fp32"
    codec_download_dtype: str = "fp32"
    # aggregation
    aggregation_rule: str = "mean"
    aggregation_trim: float = 0.2
    aggregation_max_density_tolerance: float = 0.05
    aggregation_num_malicious: int = 0  # f: Byzantine clients robust rules must tolerate
    aggregation_min_support: int = 0  # clients that must keep a coordinate; 0 = 2f + 1
    aggregation_clip_norm: float = 0.0  # "clipped-*" L2 bound per update; 0 = round median
    aggregation_krum_select: int = 0  # updates multi-Krum averages; 0 = n - f
    aggregation_vote: str = "weighted"  # consensus-mask vote: "weighted" | "robust" | plug-in
    # reply bounds (strategies.aggregation.validate): "num-examples" cap, |value| cap,
    # update norm <= factor x running median (0 = off), absolute norm cap (0 = none)
    aggregation_max_num_examples: int = 1_000_000
    aggregation_max_abs_value: float = 1e6
    aggregation_norm_bound_factor: float = 10.0
    aggregation_max_update_norm: float = 0.0
    # the served (evaluated, returned) model: the latest round's ("none"), an EMA of the
    # rounds' models ("ema", decay below) or the mean of the last average-rounds ("tail");
    # clients train from the latest (strategies.aggregation.averaging)
    aggregation_average: str = "none"
    aggregation_average_decay: float = 0.9
    aggregation_average_rounds: int = 5
    # continual learning
    cl_scenario: str = "none"  # "none" = the plain (non-continual) client path
    cl_rounds_per_task: int = 2  # server rounds per experience (scenario boundaries)
    cl_async_max_delay: int = 0  # per-client seeded arrival delay, in rounds (< rounds-per-task)
    cl_drift_detector: str = "adwin"
    cl_drift_grace: int = 30  # monitor updates (local steps) with no drift signal after a reset
    cl_drift_min_gap: int = 50  # at most one drift signal per this many local steps
    cl_regrow_task_fraction: float = 0.3  # regrowth budget on a task boundary
    cl_regrow_drift_fraction: float = 0.2  # regrowth budget on detected drift
    cl_freeze_fraction: float = 0.1  # of active, unfrozen weights frozen per finished experience
    cl_replay_capacity: int = 0  # reservoir examples kept per client (0 = no replay)
    # secure aggregation (SecAgg+, strategies/secure): "none" = plaintext replies
    secure_mode: str = "none"
    secure_threshold: float = 0.5  # t = floor(threshold * |group|) + 1 shares rebuild a secret
    secure_clip: float = 1.0  # |local - global| clip before quantizing (DP: C + 4 sigma instead)
    secure_quant_bits: int = 16  # quantization levels 2^(q-1) - 1 per side of the clip range
    secure_max_weight: int = 4096  # a client's weight is min(examples, this)
    secure_neighbors: int = 0  # SecAgg+ graph degree k (0 = complete graph: SecAgg)
    # differential privacy (strategies/privacy): "record" = DP-SGD on each site's examples,
    # "client" = clipped client updates + server noise on the public mask (DP-FedAvg)
    privacy_mode: str = "none"
    privacy_noise_multiplier: float = 1.0  # z: noise std / clip
    privacy_clip: float = 1.0  # per-example (record) or per-update (client) L2 clip C
    privacy_delta: float = 1e-5
    privacy_adaptive_clip: bool = False  # client mode: Andrew et al. 2021 geometric update
    privacy_target_quantile: float = 0.5
    privacy_clip_lr: float = 0.2
    # run bookkeeping: continue a stored run from its last committed round ("" = new run)
    resume: str = ""
    # (section, name, value) of every "<section>.options.<name>" key, sorted; not a plain key
    plugin_options: tuple[tuple[str, str, OptionValue], ...] = ()

    # ---------------------------------------------------------------------------------
    @staticmethod
    def key_of(field_name: str) -> str:
        head, _, rest = field_name.partition("_")
        if head in _SECTIONS and rest:
            return f"{head}.{rest.replace('_', '-')}"
        return field_name.replace("_", "-")

    @classmethod
    def _plain_fields(cls) -> dict[str, Any]:
        return {cls.key_of(f.name): f for f in fields(cls) if f.name != "plugin_options"}

    @classmethod
    def from_run_config(
        cls, run_config: dict[str, Any], *, check_plugins: bool = True
    ) -> LeanfedConfig:
        """Parse Flower's flat run config (dotted keys), check every value, fail before round 1.

        ``check_plugins`` also resolves every named plug-in (model, dataset, scenario,
        aggregation rule, vote, DST rule) and binds its options to its factory.
        """
        by_key = cls._plain_fields()
        options: list[tuple[str, str, OptionValue]] = []
        unknown: list[str] = []
        values: dict[str, Any] = {}
        for key, raw in run_config.items():
            section, sep, name = key.partition(".options.")
            if sep and section in OPTION_SECTIONS and name:
                if isinstance(raw, dict | list) or raw is None:
                    raise ConfigError(f"{key} = {raw!r}: expected a bool, number or string")
                options.append((section, name, raw))
            elif key not in by_key:
                unknown.append(key)
            else:
                values[by_key[key].name] = _coerce(key, raw, by_key[key].type)
        if unknown:
            raise ConfigError(
                f"unknown run-config key(s) {sorted(unknown)}; known keys: {sorted(by_key)} "
                f"and '<section>.options.<name>' for sections {OPTION_SECTIONS}"
            )
        cfg = cls(**values, plugin_options=tuple(sorted(options)))
        cfg.validate()
        if check_plugins:
            from tasks.plugins import check_plugins as check  # lazy: imports torch

            check(cfg)
        return cfg

    def to_run_config(self) -> dict[str, bool | float | int | str]:
        plain = {k: getattr(self, f.name) for k, f in self._plain_fields().items()}
        return plain | {f"{s}.options.{n}": v for s, n, v in self.plugin_options}

    def options(self, section: str) -> dict[str, OptionValue]:
        """The ``<section>.options.*`` values, by option name (hyphens kept)."""
        if section not in OPTION_SECTIONS:
            raise ValueError(f"unknown options section {section!r}; one of {OPTION_SECTIONS}")
        return {n: v for s, n, v in self.plugin_options if s == section}

    def replace(self, **changes: Any) -> LeanfedConfig:
        cfg = dataclasses.replace(self, **changes)
        cfg.validate()
        return cfg

    def dst_overrides(self) -> dict[str, float]:
        """``dst.density-overrides`` as {fnmatch pattern: density}."""
        return parse_overrides(self.dst_density_overrides)

    def validate(self) -> None:
        """Check every value and cross-field rule (tasks.config_checks)."""
        check_config(self)

    @property
    def train_nodes_per_round(self) -> int:
        """Nodes Flower's FedAvg samples a round: max(int(N * fraction-train), min-train-nodes)."""
        return max(int(self.num_partitions * self.fraction_train), self.min_train_nodes)


_SECTIONS = ("partition", "local", "dst", "codec", "aggregation", "cl", "secure", "privacy")


def _coerce(key: str, raw: Any, typ: Any) -> Any:
    name = typ if isinstance(typ, str) else getattr(typ, "__name__", str(typ))
    if name == "int":
        if isinstance(raw, bool) or not isinstance(raw, int):
            if isinstance(raw, float) and raw.is_integer():
                return int(raw)
            raise ConfigError(f"{key} = {raw!r}: expected an integer")
        return raw
    if name == "float":
        if isinstance(raw, bool) or not isinstance(raw, int | float):
            raise ConfigError(f"{key} = {raw!r}: expected a number")
        return float(raw)
    if name == "str":
        if not isinstance(raw, str):
            raise ConfigError(f"{key} = {raw!r}: expected a string")
        return raw
    if name == "bool":
        if not isinstance(raw, bool):
            raise ConfigError(f"{key} = {raw!r}: expected true or false")
        return raw
    raise ConfigError(f"{key}: unsupported field type {name}")  # pragma: no cover
