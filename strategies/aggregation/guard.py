"""What both strategies (SparseFedAvg, the dense ByteCountingFedAvg) do around validation.

One mixin so the sparse and the dense path hold the same rules: it keeps the reply
limits and the running norm bound, turns each round's `Verdict`s into the run store's
client rows, log lines and events, averages only checked metrics, and refuses a merged
model that is not finite (the round is then rejected: the global model is kept).

Everything here is recorded on the strategy, never written anywhere: the server's
recorder reads ``round_clients`` (client_results rows), ``round_eval_clients`` and
``round_events`` (events: ``reply_rejected`` for evaluate replies, ``round_rejected``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from logging import INFO, WARNING

import torch
from flwr.app import Message, MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords
from flwr.supercore import log

from strategies.aggregation.metric_rules import (
    PER_CLIENT_KEYS,
    check_metrics,
    common_keys,
    weighted_average,
)
from strategies.aggregation.validate import (
    NormBound,
    ReplyLimits,
    Verdict,
    validate_evaluate_replies,
)

Row = dict[str, object]
MetricsAggr = Callable[[list[RecordDict], str], MetricRecord]


class ReplyGuard:
    """Mixin: reply limits, norm bound, verdict bookkeeping and the merged-model check."""

    weighted_by_key: str  # provided by Flower's FedAvg

    def _init_guard(self, limits: ReplyLimits | None) -> None:
        self.limits = limits or ReplyLimits()
        self.norm_bound = NormBound(self.limits.norm_factor, self.limits.max_norm)
        self.rejections: list[dict[str, int | str]] = []
        # Per round, one row per train reply (in reply order) then one per silent node:
        # node_id, metrics, upload_bytes, download_bytes, accepted, reason.
        self.round_clients: dict[int, list[Row]] = {}
        # Per round, one row per ACCEPTED evaluate reply: {"node_id", "metrics"}.
        self.round_eval_clients: dict[int, list[Row]] = {}
        self.round_events: dict[int, list[Row]] = {}
        self.last_verdicts: dict[str, list[Verdict]] = {"train": [], "evaluate": []}

    # ------------------------------------------------------------------ train
    def _record_train(
        self,
        server_round: int,
        verdicts: Sequence[Verdict],
        sent: Mapping[int, int],
        uploads: Mapping[int, int],
    ) -> list[Row]:
        """Log and keep the round's verdicts; return its client rows (see __init__).

        `sent`: node -> download bytes of its train message; `uploads`: node -> bytes of
        its first reply's payload.
        """
        self.last_verdicts["train"] = list(verdicts)
        rows: list[Row] = []
        first: set[int] = set()
        for v in verdicts:
            if not v.accepted:
                self._reject(server_round, "train", v)
            new = v.node_id not in first
            first.add(v.node_id)
            rows.append(
                {
                    "node_id": v.node_id,
                    "metrics": dict(v.metrics),
                    "upload_bytes": uploads.get(v.node_id, 0) if new else 0,
                    "download_bytes": sent.get(v.node_id, 0) if new else 0,
                    "accepted": v.accepted,
                    "reason": v.reason,
                }
            )
        for node, down in sent.items():
            if node not in first:
                rows.append(
                    {
                        "node_id": node,
                        "metrics": {},
                        "upload_bytes": 0,
                        "download_bytes": down,
                        "accepted": False,
                        "reason": "no reply",
                    }
                )
        self.round_clients[server_round] = rows
        return rows

    def _client_rows(
        self,
        replies: Sequence[Message],
        sent: Mapping[int, int],
        uploads: Mapping[int, int],
        rejected: Sequence[tuple[int, str]],
        accepted: set[int],
    ) -> list[Row]:
        """Client rows for a strategy that judges replies itself (SecAgg): a node's first
        reply is accepted iff in `accepted`; an accepted reply's metrics are kept only if
        they pass `metric_rules`, a rejected one's not at all.
        Download bytes come from ``self._sent_bytes`` (node -> bytes), then reset."""
        sent_bytes: dict[int, int] = getattr(self, "_sent_bytes", {})
        reasons = dict(rejected)
        rows: list[Row] = []
        replied: set[int] = set()
        for msg in replies:
            node = int(msg.metadata.src_node_id)
            ok = node in accepted and node not in replied
            metrics: dict[str, int | float] = {}  # a rejected reply's claims are not kept
            if ok and not msg.has_error() and "metrics" in msg.content.metric_records:
                raw = dict(msg.content.metric_records["metrics"])
                metrics = check_metrics("train", raw, self.limits.examples_cap(node))[0]
            rows.append(
                {
                    "node_id": node,
                    "metrics": metrics,
                    "upload_bytes": uploads.get(node, 0),
                    "download_bytes": sent_bytes.get(node, 0) if node not in replied else 0,
                    "accepted": ok,
                    "reason": None if ok else reasons.get(node, "rejected"),
                }
            )
            replied.add(node)
        for node in sent:
            if node not in replied:
                rows.append(
                    {
                        "node_id": node,
                        "metrics": {},
                        "upload_bytes": 0,
                        "download_bytes": sent_bytes.get(node, 0),
                        "accepted": False,
                        "reason": "no reply",
                    }
                )
        self._sent_bytes: dict[int, int] = {}
        return rows

    def _reject(self, server_round: int, phase: str, v: Verdict) -> None:
        reason = v.reason or "rejected"
        self.rejections.append(
            {"round": server_round, "node_id": v.node_id, "phase": phase, "reason": reason}
        )
        log(INFO, "aggregate_%s: rejected node %d: %s", phase, v.node_id, reason)

    def _metrics(self, aggr: MetricsAggr, verdicts: Sequence[Verdict]) -> MetricRecord:
        """`aggr` (Flower's weighted average by default) over the accepted replies' checked
        metrics, cut to the keys all of them report."""
        # Wall-clock keys stay per client (``round_clients``): averaged into the round's
        # metrics they would make two runs of the same seed differ.
        records = common_keys(
            [
                {k: x for k, x in v.metrics.items() if k not in PER_CLIENT_KEYS}
                for v in verdicts
                if v.accepted
            ]
        )
        if not records:
            return MetricRecord()
        if aggr is aggregate_metricrecords and all(  # Flower's default, minus the records
            not isinstance(v, list) for r in records for v in r.values()
        ):
            return weighted_average(records, self.weighted_by_key)
        contents = [RecordDict({"metrics": MetricRecord(r)}) for r in records]  # type: ignore[arg-type]
        return aggr(contents, self.weighted_by_key)

    # ------------------------------------------------------------------ merged model
    def _merged_problem(self, state: Mapping[str, torch.Tensor]) -> str | None:
        """Why the merged model may not replace the global one, or None."""
        for key, t in state.items():
            if t.dtype.is_floating_point:
                if not bool(torch.isfinite(t).all()):
                    return f"merged model is not finite in {key!r}"
                if t.numel() and float(t.abs().max()) > self.limits.max_abs:
                    return f"merged model exceeds |value| {self.limits.max_abs:g} in {key!r}"
        return None

    def _reject_round(self, server_round: int, reason: str, metrics: MetricRecord) -> None:
        """Keep the global model; record why (event ``round_rejected``, metric flag)."""
        log(
            WARNING,
            "aggregate_train: round %d rejected, global model kept: %s",
            server_round,
            reason,
        )
        self.round_events.setdefault(server_round, []).append(
            {"kind": "round_rejected", "detail": {"reason": reason}}
        )
        metrics["round_rejected"] = 1

    # ------------------------------------------------------------------ evaluate
    def _check_evaluate(
        self,
        server_round: int,
        replies: Sequence[Message],
        sent: Mapping[int, int],
        aggr: MetricsAggr,
    ) -> MetricRecord | None:
        """Validate evaluate replies, record rows/events, average the accepted ones."""
        verdicts = validate_evaluate_replies(replies, sent, self.limits)
        self.last_verdicts["evaluate"] = verdicts
        rows: list[Row] = []
        for v in verdicts:
            if v.accepted:
                metrics = {k: float(x) for k, x in v.metrics.items()}
                rows.append({"node_id": v.node_id, "metrics": metrics})
                continue
            self._reject(server_round, "evaluate", v)
            self.round_events.setdefault(server_round, []).append(
                {
                    "kind": "reply_rejected",
                    "node_id": v.node_id,
                    "detail": {"phase": "evaluate", "reason": v.reason or "rejected"},
                }
            )
        self.round_eval_clients[server_round] = rows
        if not any(v.accepted for v in verdicts):
            return None
        return self._metrics(aggr, verdicts)
