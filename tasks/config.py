"""The frozen, validated run config; in tasks/ because the ServerApp and ClientApp both parse it."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

# built-ins; plug-ins: tasks.plugins. The last three are structured (strategies.sparse.structured).
RULES = ("dense", "static", "set", "rigl", "gmp", "channel", "srigl", "nm")
STRUCTURED_RULES = ("channel", "srigl", "nm")
STRATEGIES = ("sparse", "flower-fedavg")
PARTITIONS = ("iid", "dirichlet", "shards", "sample")
VALUE_DTYPES = ("fp32", "fp16", "int8")
DISTRIBUTIONS = ("erk", "uniform")
PRIVACY_MODES = ("none", "record", "client")
# SNIP/GraSP need training data, which the server never holds: federated runs start from a
# random or magnitude mask (own training loops can use strategies.sparse.saliency directly).
DST_INITS = ("random", "magnitude")
OPTIMIZERS = ("sgd", "adam")
SECURE_MODES = ("none", "secagg")
CL_SCENARIOS = ("none", "split-mnist", "permuted-mnist", "rotated-mnist", "hospital")
VOTES = ("weighted", "robust")  # built-ins of strategies.aggregation.rules.VOTE_RULES
BYZANTINE_RULES = {"krum": 2, "multi-krum": 2, "bulyan": 4}  # n >= k*f + 3 clients per round
# Plug-in options: "<section>.options.<name>" run-config keys, passed to the plug-in's factory
# as keyword arguments (hyphens -> underscores). In a TOML file that also sets `model = ...`
# quote the key: "model.options.hidden" = 64 (TOML cannot make `model` a string and a table).
OPTION_SECTIONS = ("model", "dataset", "aggregation", "dst", "cl")
OptionValue = bool | int | float | str
DRIFT_DETECTORS = ("adwin", "ddm", "both", "none")  # strategies.continual.drift.DETECTORS


class ConfigError(ValueError):
    """A run-config value is missing, of the wrong type, or out of range."""


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
        return _parse_overrides(self.dst_density_overrides)

    def validate(self) -> None:
        def need(ok: bool, key: str, what: str) -> None:
            if not ok:
                value = getattr(self, key.replace(".", "_").replace("-", "_"))
                raise ConfigError(f"{key} = {value!r}: {what}")

        need(self.num_server_rounds >= 1, "num-server-rounds", "must be >= 1")
        need(self.strategy in STRATEGIES, "strategy", f"must be one of {STRATEGIES}")
        need(0.0 < self.fraction_train <= 1.0, "fraction-train", "must be in (0, 1]")
        need(0.0 <= self.fraction_evaluate <= 1.0, "fraction-evaluate", "must be in [0, 1]")
        need(self.min_train_nodes >= 1, "min-train-nodes", "must be >= 1")
        need(self.min_accepted_replies >= 0, "min-accepted-replies", "must be >= 0")
        need(self.partition_scheme in PARTITIONS, "partition.scheme", f"one of {PARTITIONS}")
        need(self.partition_alpha > 0, "partition.alpha", "must be > 0")
        need(self.partition_shards >= 1, "partition.shards", "must be >= 1")
        need(self.partition_sample_size >= 1, "partition.sample-size", "must be >= 1")
        need(self.num_partitions >= 1, "num-partitions", "must be >= 1")
        need(self.local_steps >= 1, "local.steps", "must be >= 1")
        need(self.local_batch_size >= 1, "local.batch-size", "must be >= 1")
        need(self.local_lr > 0, "local.lr", "must be > 0")
        need(self.local_optimizer in OPTIMIZERS, "local.optimizer", f"must be one of {OPTIMIZERS}")
        need(0.0 <= self.local_momentum < 1.0, "local.momentum", "must be in [0, 1)")
        need(self.local_weight_decay >= 0, "local.weight-decay", "must be >= 0")
        plugin = "or a plug-in 'package.module:factory'"
        need(self.dst_rule != "", "dst.rule", f"must be one of {RULES} {plugin}")
        need(0.0 < self.dst_density <= 1.0, "dst.density", "must be in (0, 1]")
        need(self.dst_distribution in DISTRIBUTIONS, "dst.distribution", f"one of {DISTRIBUTIONS}")
        need(0.0 <= self.dst_drop_fraction < 1.0, "dst.drop-fraction", "must be in [0, 1)")
        need(self.dst_update_interval >= 1, "dst.update-interval", "must be >= 1")
        need(self.dst_mask_round_interval >= 1, "dst.mask-round-interval", "must be >= 1")
        need(0.0 < self.dst_end_round_fraction <= 1.0, "dst.end-round-fraction", "in (0, 1]")
        need(0.0 <= self.dst_erk_power_scale <= 4.0, "dst.erk-power-scale", "must be in [0, 4]")
        need(self.dst_init in DST_INITS, "dst.init", f"must be one of {DST_INITS}")
        self.dst_overrides()  # raises ConfigError naming the bad item
        dtypes = f"one of {VALUE_DTYPES}"
        need(self.codec_upload_dtype in VALUE_DTYPES, "codec.upload-dtype", dtypes)
        need(self.codec_download_dtype in VALUE_DTYPES, "codec.download-dtype", dtypes)
        need(0.0 <= self.aggregation_trim < 0.5, "aggregation.trim", "must be in [0, 0.5)")
        need(
            self.aggregation_max_density_tolerance >= 0,
            "aggregation.max-density-tolerance",
            "must be >= 0",
        )
        self._validate_sampling(need)
        self._validate_robust(need)
        need(self.aggregation_max_num_examples >= 1, "aggregation.max-num-examples", "must be >= 1")
        need(self.aggregation_max_abs_value > 0, "aggregation.max-abs-value", "must be > 0")
        need(
            self.aggregation_norm_bound_factor == 0 or self.aggregation_norm_bound_factor >= 1,
            "aggregation.norm-bound-factor",
            "must be 0 (off) or >= 1",
        )
        need(self.aggregation_max_update_norm >= 0, "aggregation.max-update-norm", "must be >= 0")
        need(self.cl_scenario != "", "cl.scenario", f"'none', one of {CL_SCENARIOS} {plugin}")
        need(self.local_proximal_mu >= 0, "local.proximal-mu", "must be >= 0")
        need(self.cl_rounds_per_task >= 1, "cl.rounds-per-task", "must be >= 1")
        need(
            0 <= self.cl_async_max_delay < self.cl_rounds_per_task,
            "cl.async-max-delay",
            "must be in [0, cl.rounds-per-task)",
        )
        need(
            self.cl_drift_detector in DRIFT_DETECTORS,
            "cl.drift-detector",
            f"must be one of {DRIFT_DETECTORS}",
        )
        need(self.cl_drift_grace >= 0, "cl.drift-grace", "must be >= 0")
        need(self.cl_drift_min_gap >= 1, "cl.drift-min-gap", "must be >= 1")
        for key in ("cl.regrow-task-fraction", "cl.regrow-drift-fraction"):
            value = getattr(self, key.replace(".", "_").replace("-", "_"))
            need(0.0 <= value <= 1.0, key, "must be in [0, 1]")
        need(0.0 <= self.cl_freeze_fraction < 1.0, "cl.freeze-fraction", "must be in [0, 1)")
        need(self.cl_replay_capacity >= 0, "cl.replay-capacity", "must be >= 0")
        need(self.privacy_mode in PRIVACY_MODES, "privacy.mode", f"one of {PRIVACY_MODES}")
        need(self.privacy_noise_multiplier > 0, "privacy.noise-multiplier", "must be > 0")
        need(self.privacy_clip > 0, "privacy.clip", "must be > 0")
        need(0.0 < self.privacy_delta < 1.0, "privacy.delta", "must be in (0, 1)")
        need(0.0 < self.privacy_target_quantile < 1.0, "privacy.target-quantile", "in (0, 1)")
        need(self.privacy_clip_lr > 0, "privacy.clip-lr", "must be > 0")
        if self.privacy_mode != "none" and self.strategy == "flower-fedavg":
            raise ConfigError(
                "privacy.mode needs strategy = 'sparse': the dense Flower baseline has no DP here"
            )
        need(self.secure_mode in SECURE_MODES, "secure.mode", f"must be one of {SECURE_MODES}")
        need(0.5 <= self.secure_threshold < 1.0, "secure.threshold", "must be in [0.5, 1)")
        need(self.secure_clip > 0, "secure.clip", "must be > 0")
        need(2 <= self.secure_quant_bits <= 32, "secure.quant-bits", "must be in [2, 32]")
        need(1 <= self.secure_max_weight <= 2**20, "secure.max-weight", "must be in [1, 2^20]")
        need(self.secure_neighbors >= 0, "secure.neighbors", "must be >= 0")
        if self.secure_mode == "secagg" and (
            self.strategy != "sparse"
            or self.aggregation_rule != "mean"
            or self.aggregation_vote != "weighted"
        ):
            raise ConfigError(
                "secure.mode = 'secagg' sums updates securely: it needs strategy = 'sparse', "
                "aggregation.rule = 'mean' and aggregation.vote = 'weighted' (votes are "
                "then counted per client)"
            )
        if self.privacy_mode == "client" and self.secure_mode == "secagg":
            self._check_distributed_dp()
        if self.strategy == "flower-fedavg":
            self._check_dense_baseline()
        self._check_structured()

    def _check_structured(self) -> None:
        """Structured rules vote whole units (weighted vote only); condensed clients need the
        channel/srigl unit structure and the plain sparse path (no DP, SecAgg or stream)."""
        if self.dst_rule in STRUCTURED_RULES and self.aggregation_vote != "weighted":
            raise ConfigError(
                f"dst.rule = {self.dst_rule!r} votes whole units: it needs "
                "aggregation.vote = 'weighted'"
            )
        if not self.dst_condensed:
            return
        if self.dst_rule not in ("channel", "srigl"):
            raise ConfigError("dst.condensed = true needs dst.rule = 'channel' or 'srigl'")
        for key, value in (
            ("privacy.mode", self.privacy_mode),
            ("secure.mode", self.secure_mode),
            ("cl.scenario", self.cl_scenario),
        ):
            if value != "none":
                raise ConfigError(f"dst.condensed = true does not support {key} = {value!r} yet")

    def _check_distributed_dp(self) -> None:
        """secagg + client-level DP: clients noise their own clipped updates (strategies.privacy.
        distributed); the unweighted DP-FedAvg sum of noisy values must fit the 62-bit ring."""
        # values ring: quant-bits + 1 spare bit + ceil(log2(clients)) (privacy.distributed)
        need_bits = self.secure_quant_bits + 1 + max(1, self.num_partitions).bit_length()
        if need_bits > 62:
            raise ConfigError(
                f"secure.quant-bits = {self.secure_quant_bits} with {self.num_partitions} clients "
                f"needs a {need_bits}-bit ring for the noised sum (max 62): lower secure.quant-bits"
            )
        if self.min_train_nodes < 2:
            raise ConfigError(
                "secure.mode = 'secagg' with privacy.mode = 'client' needs min-train-nodes >= 2: "
                "each client adds only a 1/n_min share of the noise"
            )

    def _check_dense_baseline(self) -> None:
        """Flower's FedAvg aggregates densely by itself: leanfed's server rules do not apply."""
        if self.dst_rule != "dense":
            raise ConfigError(
                "strategy = 'flower-fedavg' is the dense baseline: set dst.rule = 'dense'"
            )
        for key, value, default in (
            ("aggregation.rule", self.aggregation_rule, "mean"),
            ("aggregation.vote", self.aggregation_vote, "weighted"),
        ):
            if value != default:
                raise ConfigError(
                    f"{key} = {value!r} does not apply to strategy = 'flower-fedavg' (Flower's "
                    "own dense FedAvg); use strategy = 'sparse' with dst.rule = 'dense' for a "
                    "dense run with this rule"
                )
        if self.options("aggregation"):
            raise ConfigError(
                "aggregation.options.* do not apply to strategy = 'flower-fedavg' "
                "(Flower's own dense FedAvg); use strategy = 'sparse' with dst.rule = 'dense'"
            )

    @property
    def train_nodes_per_round(self) -> int:
        """Nodes Flower's FedAvg samples a round: max(int(N * fraction-train), min-train-nodes)."""
        return max(int(self.num_partitions * self.fraction_train), self.min_train_nodes)

    def _validate_sampling(self, need: Callable[[bool, str, str], None]) -> None:
        # Flower's sample_nodes waits, without a timeout, until min-train-nodes nodes are
        # connected: more than there are partitions would wait forever, so refuse it here.
        need(
            self.min_train_nodes <= self.num_partitions,
            "min-train-nodes",
            f"above num-partitions = {self.num_partitions}: Flower would wait forever for "
            "that many nodes",
        )
        need(
            self.min_accepted_replies <= self.train_nodes_per_round,
            "min-accepted-replies",
            f"above the {self.train_nodes_per_round} nodes sampled per round "
            "(num-partitions x fraction-train, at least min-train-nodes): every round would "
            "be degraded",
        )

    def _validate_robust(self, need: Callable[[bool, str, str], None]) -> None:
        need(self.aggregation_num_malicious >= 0, "aggregation.num-malicious", "must be >= 0")
        need(self.aggregation_min_support >= 0, "aggregation.min-support", "must be >= 0")
        need(self.aggregation_clip_norm >= 0, "aggregation.clip-norm", "must be >= 0")
        need(self.aggregation_krum_select >= 0, "aggregation.krum-select", "must be >= 0")
        need(self.aggregation_vote != "", "aggregation.vote", f"one of {VOTES} or a plug-in")
        k = BYZANTINE_RULES.get(self.aggregation_rule)
        if k is not None:
            per_round = max(int(self.num_partitions * self.fraction_train), self.min_train_nodes)
            f = self.aggregation_num_malicious
            if per_round < k * f + 3:
                raise ConfigError(
                    f"aggregation.rule = {self.aggregation_rule!r} with aggregation.num-malicious"
                    f" = {f} needs at least {k * f + 3} clients per round, the config samples"
                    f" {per_round} (num-partitions x fraction-train, at least min-train-nodes)"
                )


def _parse_overrides(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        pattern, sep, value = item.partition("=")
        try:
            d = float(value)
        except ValueError:
            d = float("nan")
        if not sep or not pattern.strip() or not 0.0 < d <= 1.0:
            raise ConfigError(
                f"dst.density-overrides: item {item!r} must be 'pattern=density' with density "
                "in (0, 1]"
            )
        out[pattern.strip()] = d
    return out


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
