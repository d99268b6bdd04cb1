"""The run config's allowed values and every check of a LeanfedConfig (ranges, cross-field)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tasks.config import LeanfedConfig

__all__ = ["ConfigError", "check_config", "parse_overrides"]

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
AVERAGES = ("none", "ema", "tail")  # strategies.aggregation.averaging.AVERAGES (tested)
VOTES = ("weighted", "robust")  # built-ins of strategies.aggregation.rules.VOTE_RULES
BYZANTINE_RULES = {"krum": 2, "multi-krum": 2, "bulyan": 4}  # n >= k*f + 3 clients per round
# Plug-in options: "<section>.options.<name>" run-config keys, passed to the plug-in's factory
# as keyword arguments (hyphens -> underscores). In a TOML file that also sets `model = ...`
# quote the key: "model.options.hidden" = 64 (TOML cannot make `model` a string and a table).
OPTION_SECTIONS = ("model", "dataset", "aggregation", "dst", "cl")
OptionValue = bool | int | float | str
DRIFT_DETECTORS = ("adwin", "ddm", "both", "none")  # strategies.continual.drift.DETECTORS


Need = Callable[[bool, str, str], None]  # need(ok, run-config key, what is wrong)


class ConfigError(ValueError):
    """A run-config value is missing, of the wrong type, or out of range."""


def check_config(cfg: LeanfedConfig) -> None:
    """Every range and cross-field rule of the run config; raises a one-line ConfigError."""

    def need(ok: bool, key: str, what: str) -> None:
        if not ok:
            value = getattr(cfg, key.replace(".", "_").replace("-", "_"))
            raise ConfigError(f"{key} = {value!r}: {what}")

    need(cfg.num_server_rounds >= 1, "num-server-rounds", "must be >= 1")
    need(cfg.strategy in STRATEGIES, "strategy", f"must be one of {STRATEGIES}")
    need(0.0 < cfg.fraction_train <= 1.0, "fraction-train", "must be in (0, 1]")
    need(0.0 <= cfg.fraction_evaluate <= 1.0, "fraction-evaluate", "must be in [0, 1]")
    need(cfg.min_train_nodes >= 1, "min-train-nodes", "must be >= 1")
    need(cfg.min_accepted_replies >= 0, "min-accepted-replies", "must be >= 0")
    need(cfg.partition_scheme in PARTITIONS, "partition.scheme", f"one of {PARTITIONS}")
    need(cfg.validation_size >= 0, "validation-size", "must be >= 0")
    need(cfg.partition_alpha > 0, "partition.alpha", "must be > 0")
    need(cfg.partition_shards >= 1, "partition.shards", "must be >= 1")
    need(cfg.partition_sample_size >= 1, "partition.sample-size", "must be >= 1")
    need(cfg.num_partitions >= 1, "num-partitions", "must be >= 1")
    need(cfg.local_steps >= 1, "local.steps", "must be >= 1")
    need(cfg.local_batch_size >= 1, "local.batch-size", "must be >= 1")
    need(cfg.local_lr > 0, "local.lr", "must be > 0")
    need(cfg.local_optimizer in OPTIMIZERS, "local.optimizer", f"must be one of {OPTIMIZERS}")
    need(0.0 <= cfg.local_momentum < 1.0, "local.momentum", "must be in [0, 1)")
    need(cfg.local_weight_decay >= 0, "local.weight-decay", "must be >= 0")
    plugin = "or a plug-in 'package.module:factory'"
    need(cfg.dst_rule != "", "dst.rule", f"must be one of {RULES} {plugin}")
    need(0.0 < cfg.dst_density <= 1.0, "dst.density", "must be in (0, 1]")
    need(cfg.dst_distribution in DISTRIBUTIONS, "dst.distribution", f"one of {DISTRIBUTIONS}")
    need(0.0 <= cfg.dst_drop_fraction < 1.0, "dst.drop-fraction", "must be in [0, 1)")
    need(cfg.dst_update_interval >= 1, "dst.update-interval", "must be >= 1")
    need(cfg.dst_mask_round_interval >= 1, "dst.mask-round-interval", "must be >= 1")
    need(0.0 < cfg.dst_end_round_fraction <= 1.0, "dst.end-round-fraction", "in (0, 1]")
    need(0.0 <= cfg.dst_erk_power_scale <= 4.0, "dst.erk-power-scale", "must be in [0, 4]")
    need(cfg.dst_init in DST_INITS, "dst.init", f"must be one of {DST_INITS}")
    cfg.dst_overrides()  # raises ConfigError naming the bad item
    dtypes = f"one of {VALUE_DTYPES}"
    need(cfg.codec_upload_dtype in VALUE_DTYPES, "codec.upload-dtype", dtypes)
    need(cfg.codec_download_dtype in VALUE_DTYPES, "codec.download-dtype", dtypes)
    need(0.0 <= cfg.aggregation_trim < 0.5, "aggregation.trim", "must be in [0, 0.5)")
    need(
        cfg.aggregation_max_density_tolerance >= 0,
        "aggregation.max-density-tolerance",
        "must be >= 0",
    )
    _check_sampling(cfg, need)
    _check_robust(cfg, need)
    need(cfg.aggregation_max_num_examples >= 1, "aggregation.max-num-examples", "must be >= 1")
    need(cfg.aggregation_max_abs_value > 0, "aggregation.max-abs-value", "must be > 0")
    need(
        cfg.aggregation_norm_bound_factor == 0 or cfg.aggregation_norm_bound_factor >= 1,
        "aggregation.norm-bound-factor",
        "must be 0 (off) or >= 1",
    )
    need(cfg.aggregation_max_update_norm >= 0, "aggregation.max-update-norm", "must be >= 0")
    need(cfg.aggregation_average in AVERAGES, "aggregation.average", f"one of {AVERAGES}")
    need(0.0 <= cfg.aggregation_average_decay < 1.0, "aggregation.average-decay", "in [0, 1)")
    need(cfg.aggregation_average_rounds >= 1, "aggregation.average-rounds", "must be >= 1")
    need(cfg.cl_scenario != "", "cl.scenario", f"'none', one of {CL_SCENARIOS} {plugin}")
    need(cfg.local_proximal_mu >= 0, "local.proximal-mu", "must be >= 0")
    need(cfg.cl_rounds_per_task >= 1, "cl.rounds-per-task", "must be >= 1")
    need(
        0 <= cfg.cl_async_max_delay < cfg.cl_rounds_per_task,
        "cl.async-max-delay",
        "must be in [0, cl.rounds-per-task)",
    )
    need(
        cfg.cl_drift_detector in DRIFT_DETECTORS,
        "cl.drift-detector",
        f"must be one of {DRIFT_DETECTORS}",
    )
    need(cfg.cl_drift_grace >= 0, "cl.drift-grace", "must be >= 0")
    need(cfg.cl_drift_min_gap >= 1, "cl.drift-min-gap", "must be >= 1")
    for key in ("cl.regrow-task-fraction", "cl.regrow-drift-fraction"):
        value = getattr(cfg, key.replace(".", "_").replace("-", "_"))
        need(0.0 <= value <= 1.0, key, "must be in [0, 1]")
    need(0.0 <= cfg.cl_freeze_fraction < 1.0, "cl.freeze-fraction", "must be in [0, 1)")
    need(cfg.cl_replay_capacity >= 0, "cl.replay-capacity", "must be >= 0")
    need(cfg.privacy_mode in PRIVACY_MODES, "privacy.mode", f"one of {PRIVACY_MODES}")
    need(cfg.privacy_noise_multiplier > 0, "privacy.noise-multiplier", "must be > 0")
    need(cfg.privacy_clip > 0, "privacy.clip", "must be > 0")
    need(0.0 < cfg.privacy_delta < 1.0, "privacy.delta", "must be in (0, 1)")
    need(0.0 < cfg.privacy_target_quantile < 1.0, "privacy.target-quantile", "in (0, 1)")
    need(cfg.privacy_clip_lr > 0, "privacy.clip-lr", "must be > 0")
    if cfg.privacy_mode != "none" and cfg.strategy == "flower-fedavg":
        raise ConfigError(
            "privacy.mode needs strategy = 'sparse': the dense Flower baseline has no DP here"
        )
    need(cfg.secure_mode in SECURE_MODES, "secure.mode", f"must be one of {SECURE_MODES}")
    need(0.5 <= cfg.secure_threshold < 1.0, "secure.threshold", "must be in [0.5, 1)")
    need(cfg.secure_clip > 0, "secure.clip", "must be > 0")
    need(2 <= cfg.secure_quant_bits <= 32, "secure.quant-bits", "must be in [2, 32]")
    need(1 <= cfg.secure_max_weight <= 2**20, "secure.max-weight", "must be in [1, 2^20]")
    need(cfg.secure_neighbors >= 0, "secure.neighbors", "must be >= 0")
    if cfg.secure_mode == "secagg" and (
        cfg.strategy != "sparse"
        or cfg.aggregation_rule != "mean"
        or cfg.aggregation_vote != "weighted"
    ):
        raise ConfigError(
            "secure.mode = 'secagg' sums updates securely: it needs strategy = 'sparse', "
            "aggregation.rule = 'mean' and aggregation.vote = 'weighted' (votes are "
            "then counted per client)"
        )
    if cfg.privacy_mode == "record" and cfg.cl_scenario != "none":
        # continual clients train on their stream without DP-SGD (client.continual): the run
        # would claim record-level DP it does not give (and the server, which recomputes
        # each site's epsilon, would reject every reply for lacking one)
        raise ConfigError(
            f"privacy.mode = 'record' does not support cl.scenario = {cfg.cl_scenario!r} yet"
        )
    if cfg.privacy_mode == "client" and cfg.secure_mode == "secagg":
        _check_distributed_dp(cfg)
    if cfg.strategy == "flower-fedavg":
        _check_dense_baseline(cfg)
    _check_structured(cfg)


def _check_structured(cfg: LeanfedConfig) -> None:
    """Structured rules vote whole units (weighted vote only); condensed clients need the
    channel/srigl unit structure and the plain sparse path (no DP, SecAgg or stream)."""
    if cfg.dst_rule in STRUCTURED_RULES and cfg.aggregation_vote != "weighted":
        raise ConfigError(
            f"dst.rule = {cfg.dst_rule!r} votes whole units: it needs aggregation.vote = 'weighted'"
        )
    if not cfg.dst_condensed:
        return
    if cfg.dst_rule not in ("channel", "srigl"):
        raise ConfigError("dst.condensed = true needs dst.rule = 'channel' or 'srigl'")
    for key, value in (
        ("privacy.mode", cfg.privacy_mode),
        ("secure.mode", cfg.secure_mode),
        ("cl.scenario", cfg.cl_scenario),
    ):
        if value != "none":
            raise ConfigError(f"dst.condensed = true does not support {key} = {value!r} yet")


def _check_distributed_dp(cfg: LeanfedConfig) -> None:
    """secagg + client-level DP: clients noise their own clipped updates (strategies.privacy.
    distributed); the unweighted DP-FedAvg sum of noisy values must fit the 62-bit ring."""
    # values ring: quant-bits + 1 spare bit + ceil(log2(clients)) (privacy.distributed)
    need_bits = cfg.secure_quant_bits + 1 + max(1, cfg.num_partitions).bit_length()
    if need_bits > 62:
        raise ConfigError(
            f"secure.quant-bits = {cfg.secure_quant_bits} with {cfg.num_partitions} clients "
            f"needs a {need_bits}-bit ring for the noised sum (max 62): lower secure.quant-bits"
        )
    if cfg.min_train_nodes < 2:
        raise ConfigError(
            "secure.mode = 'secagg' with privacy.mode = 'client' needs min-train-nodes >= 2: "
            "each client adds only a 1/n_min share of the noise"
        )


def _check_dense_baseline(cfg: LeanfedConfig) -> None:
    """Flower's FedAvg aggregates densely by itself: leanfed's server rules do not apply."""
    if cfg.dst_rule != "dense":
        raise ConfigError(
            "strategy = 'flower-fedavg' is the dense baseline: set dst.rule = 'dense'"
        )
    for key, value, default in (
        ("aggregation.rule", cfg.aggregation_rule, "mean"),
        ("aggregation.vote", cfg.aggregation_vote, "weighted"),
    ):
        if value != default:
            raise ConfigError(
                f"{key} = {value!r} does not apply to strategy = 'flower-fedavg' (Flower's "
                "own dense FedAvg); use strategy = 'sparse' with dst.rule = 'dense' for a "
                "dense run with this rule"
            )
    if cfg.options("aggregation"):
        raise ConfigError(
            "aggregation.options.* do not apply to strategy = 'flower-fedavg' "
            "(Flower's own dense FedAvg); use strategy = 'sparse' with dst.rule = 'dense'"
        )


def _check_sampling(cfg: LeanfedConfig, need: Need) -> None:
    # Flower's sample_nodes waits, without a timeout, until min-train-nodes nodes are
    # connected: more than there are partitions would wait forever, so refuse it here.
    need(
        cfg.min_train_nodes <= cfg.num_partitions,
        "min-train-nodes",
        f"above num-partitions = {cfg.num_partitions}: Flower would wait forever for "
        "that many nodes",
    )
    need(
        cfg.min_accepted_replies <= cfg.train_nodes_per_round,
        "min-accepted-replies",
        f"above the {cfg.train_nodes_per_round} nodes sampled per round "
        "(num-partitions x fraction-train, at least min-train-nodes): every round would "
        "be degraded",
    )


def _check_robust(cfg: LeanfedConfig, need: Need) -> None:
    need(cfg.aggregation_num_malicious >= 0, "aggregation.num-malicious", "must be >= 0")
    need(cfg.aggregation_min_support >= 0, "aggregation.min-support", "must be >= 0")
    need(cfg.aggregation_clip_norm >= 0, "aggregation.clip-norm", "must be >= 0")
    need(cfg.aggregation_krum_select >= 0, "aggregation.krum-select", "must be >= 0")
    need(cfg.aggregation_vote != "", "aggregation.vote", f"one of {VOTES} or a plug-in")
    k = BYZANTINE_RULES.get(cfg.aggregation_rule)
    if k is not None:
        per_round = max(int(cfg.num_partitions * cfg.fraction_train), cfg.min_train_nodes)
        f = cfg.aggregation_num_malicious
        if per_round < k * f + 3:
            raise ConfigError(
                f"aggregation.rule = {cfg.aggregation_rule!r} with aggregation.num-malicious"
                f" = {f} needs at least {k * f + 3} clients per round, the config samples"
                f" {per_round} (num-partitions x fraction-train, at least min-train-nodes)"
            )


def parse_overrides(text: str) -> dict[str, float]:
    """``dst.density-overrides`` text "pattern=density,..." -> {fnmatch pattern: density}."""
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
