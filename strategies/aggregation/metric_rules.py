"""The metric records a reply may carry: each known key's type and bounds, and the check.

Rule (train and evaluate replies alike): the reply holds exactly one MetricRecord,
"metrics"; "num-examples" is required, a positive int, at most the configured cap and, where
the server knows the node's partition size, at most that; every other KNOWN key is
optional but, if present, must be a finite scalar of its type within its bounds (a bad
value rejects the whole reply: it came from a broken or hostile client); UNKNOWN keys are
dropped (never aggregated or stored), so a client with extra metrics is not punished and a
hostile one cannot push keys into the store or break Flower's key-consistency check.
Register a key of your own ClientApp with `register_metric`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import cast

from flwr.app import MetricRecord
from flwr.app.typing import MetricRecordValues

WEIGHT_KEY = "num-examples"
MAX_METRIC_KEYS = 256  # a reply with more keys than this is refused outright
_BIG = float(2**53)  # integer counters: exact in float64, the aggregation arithmetic


@dataclass(frozen=True)
class MetricRule:
    """One metric: int or float, and its inclusive bounds."""

    kind: type  # int (bool refused) or float (int accepted)
    lo: float
    hi: float

    def problem(self, value: object) -> str | None:
        """Why `value` breaks this rule, or None."""
        if isinstance(value, bool) or not isinstance(value, int | float):
            return f"must be a scalar {self.kind.__name__}, got {type(value).__name__}"
        if self.kind is int and not isinstance(value, int):
            return f"must be an int, got {value!r}"
        if isinstance(value, float) and not math.isfinite(value):
            return f"must be finite, got {value!r}"
        if not self.lo <= value <= self.hi:
            return f"must be in [{self.lo:g}, {self.hi:g}], got {value!r}"
        return None


_FLAG = MetricRule(int, 0, 1)
_COUNT = MetricRule(int, 0, _BIG)
_LOSS = MetricRule(float, 0.0, 1e9)
_FRACTION = MetricRule(float, 0.0, 1.0)
EPSILON_KEY = "dp_epsilon"
# No meaningful guarantee is near this bound; a larger epsilon is broken or hostile.
MAX_EPSILON = 1e6
EPSILON_RULE = MetricRule(float, 0.0, MAX_EPSILON)
# record-level DP: how many rounds the site has trained (DP-SGD) in this run, this one included
DP_ROUNDS_KEY = "dp_rounds"
DP_ROUNDS_RULE = MetricRule(int, 1, 1e6)

TRAIN_METRICS: dict[str, MetricRule] = {
    WEIGHT_KEY: MetricRule(int, 1, _BIG),
    "train_loss": _LOSS,
    "density": _FRACTION,
    "upload_bytes": _COUNT,
    "regrew": _FLAG,
    "dropped": _COUNT,
    "grown": _COUNT,
    "drift": _FLAG,
    # continual clients (client.continual.continual_round)
    "task_switch": _FLAG,
    "task_id": MetricRule(int, 0, 1e6),
    "experience": MetricRule(int, 0, 1e6),
    "replay_size": _COUNT,
    "frozen": _COUNT,
    "train_flops": _COUNT,
    # the node's declared budget (node config "capacity"; strategies.aggregation.condensed)
    "capacity": MetricRule(float, 1e-6, 1.0),
    "train_s": MetricRule(float, 0.0, 1e7),  # seconds of local training this round
    # record-level DP: the site's own epsilon(delta) so far and the rounds it trained
    # (client.dp_local.account_site; recomputed by strategies.aggregation.site_epsilon)
    EPSILON_KEY: EPSILON_RULE,
    DP_ROUNDS_KEY: DP_ROUNDS_RULE,
}
EVALUATE_METRICS: dict[str, MetricRule] = {
    WEIGHT_KEY: MetricRule(int, 1, _BIG),
    "eval_loss": _LOSS,
    "eval_acc": _FRACTION,
}
# Keys matching these patterns follow the rule too (continual: accuracy per task j).
EVALUATE_PATTERNS: list[tuple[re.Pattern[str], MetricRule]] = [
    (re.compile(r"task_acc\.\d{1,4}"), _FRACTION),
]
# Wall-clock metrics: kept per client, never averaged into a round's (reproducible) metrics.
TIMING_KEYS = frozenset({"train_s"})
# Kept per client, never averaged: timing, and a site's epsilon (a round reports the LARGEST
# site epsilon, `dp.DPSparseFedAvg`; an average would understate the worst site's loss).
PER_CLIENT_KEYS = TIMING_KEYS | {EPSILON_KEY, DP_ROUNDS_KEY}
_RULES = {"train": TRAIN_METRICS, "evaluate": EVALUATE_METRICS}
_PATTERNS: dict[str, list[tuple[re.Pattern[str], MetricRule]]] = {
    "train": [],
    "evaluate": EVALUATE_PATTERNS,
}


def register_metric(phase: str, key: str, rule: MetricRule) -> None:
    """Accept (and check) metric `key` in `phase` ("train" or "evaluate") replies."""
    if phase not in _RULES:
        raise ValueError(f"phase must be 'train' or 'evaluate', got {phase!r}")
    if key == WEIGHT_KEY:
        raise ValueError(f"{WEIGHT_KEY!r} has a fixed rule")
    _RULES[phase][key] = rule


def _rule(phase: str, key: str) -> MetricRule | None:
    rule = _RULES[phase].get(key)
    if rule is None:
        for pattern, r in _PATTERNS[phase]:
            if pattern.fullmatch(key):
                return r
    return rule


def check_metrics(
    phase: str,
    metrics: Mapping[str, object],
    max_examples: int,
) -> tuple[dict[str, int | float], str | None]:
    """(the known metrics, or {} ; the reason the record is refused, or None).

    `max_examples`: the cap on "num-examples" (the configured cap, or the node's
    partition size where the server knows it, whichever is smaller).
    """
    if len(metrics) > MAX_METRIC_KEYS:
        return {}, f"metric record has {len(metrics)} keys (at most {MAX_METRIC_KEYS})"
    if WEIGHT_KEY not in metrics:
        return {}, f"metric {WEIGHT_KEY!r} is missing"
    kept: dict[str, int | float] = {}
    for key, value in metrics.items():
        rule = _rule(phase, key)
        if rule is None:
            continue  # unknown key: dropped
        problem = rule.problem(value)
        if problem is not None:
            return {}, f"metric {key!r} {problem}"
        kept[key] = value  # type: ignore[assignment]
    n = kept[WEIGHT_KEY]
    if n > max_examples:
        return {}, f"metric {WEIGHT_KEY!r} = {n} exceeds the cap {max_examples}"
    return kept, None


def common_keys(records: list[dict[str, int | float]]) -> list[dict[str, int | float]]:
    """The records cut to the keys all of them hold (what an average over them can use).

    Flower's metric aggregation sums each key over the records that have it: a key only
    some clients report would be averaged with the wrong total weight.
    """
    if not records:
        return []
    keys = set(records[0]).intersection(*records[1:])
    return [{k: v for k, v in r.items() if k in keys} for r in records]


def weighted_average(records: list[dict[str, int | float]], weight_key: str) -> MetricRecord:
    """Flower's ``aggregate_metricrecords`` over plain dicts: every key but ``weight_key``
    averaged with weights ``w / sum(w)``, in the same operations and order, so the same
    floats, without building a RecordDict and a MetricRecord per reply."""
    weights = [r[weight_key] for r in records]
    total = sum(weights)
    out: dict[str, int | float] = {}
    for record, factor in zip(records, [w / total for w in weights], strict=True):
        for key, value in record.items():
            if key != weight_key:
                out[key] = value * factor if key not in out else out[key] + value * factor
    return MetricRecord(cast(dict[str, MetricRecordValues], out))


# The plaintext record of a masked SecAgg+ reply under record-level DP: its keys and rules.
DP_RECORD_RULES: dict[str, MetricRule] = {
    EPSILON_KEY: EPSILON_RULE,
    DP_ROUNDS_KEY: DP_ROUNDS_RULE,
    WEIGHT_KEY: TRAIN_METRICS[WEIGHT_KEY],
}


def check_epsilon_record(
    metric_records: Mapping[str, Mapping[str, object]],
    max_examples: int,
) -> tuple[dict[str, int | float], str | None]:
    """(the site's checked accounting record, or {} ; why the record is refused, or None).

    The only plaintext a masked SecAgg+ train reply may carry under record-level DP:
    exactly one MetricRecord "metrics" holding exactly the keys of ``DP_RECORD_RULES`` (the
    site's epsilon, the rounds it trained and its example count, from which the server
    recomputes the epsilon: `strategies.aggregation.site_epsilon`), each within its rule,
    "num-examples" at most ``max_examples``. Anything else in clear (another record,
    another key) is refused, not dropped: the protocol defines this record, and a reply that
    breaks it is treated as a dropout, so the sum never includes an input the server could
    not check.
    """
    if set(metric_records) != {"metrics"}:
        names = sorted(str(k) for k in metric_records)[:4]
        return {}, f"plaintext record must be exactly 'metrics', got {names}"
    metrics = metric_records["metrics"]
    if set(metrics) != set(DP_RECORD_RULES):
        expected = ", ".join(repr(k) for k in DP_RECORD_RULES)
        return {}, f"plaintext metrics must hold exactly {expected} ({len(metrics)} keys)"
    kept: dict[str, int | float] = {}
    for key, rule in DP_RECORD_RULES.items():
        value = metrics[key]
        problem = rule.problem(value)
        if problem is not None:
            return {}, f"metric {key!r} {problem}"
        kept[key] = value  # type: ignore[assignment]
    if kept[WEIGHT_KEY] > max_examples:
        return {}, f"metric {WEIGHT_KEY!r} = {kept[WEIGHT_KEY]} exceeds the cap {max_examples}"
    return kept, None
