"""Flower's stock FedAvg with byte counting and reply validation: the dense baseline.

Its maths are Flower's, untouched: `aggregate_train` only filters (every reply checked
by the same rules as the sparse strategy, see `validate`) and hands Flower's FedAvg the
accepted replies, each reduced to its checked arrays and the metric keys all accepted
replies share, so Flower's key-consistency check can no longer be tripped by one client.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from strategies.aggregation.guard import ReplyGuard
from strategies.aggregation.metric_rules import PER_CLIENT_KEYS, common_keys
from strategies.aggregation.validate import ModelSpec, ReplyLimits, validate_replies
from strategies.aggregation.wire import decode_dense


def arrayrecord_bytes(record: ArrayRecord) -> int:
    """Bytes of the serialized arrays Flower puts on the wire for this record."""
    return sum(len(array.data) for array in record.values())


def _with_content(msg: Message, content: RecordDict) -> Message:
    """A shallow copy of reply `msg` (same metadata) holding `content` instead."""
    out = copy.copy(msg)
    out.content = content
    return out


class ByteCountingFedAvg(ReplyGuard, FedAvg):
    """``flwr.serverapp.strategy.FedAvg`` that validates replies and logs payload bytes.

    Counting mirrors SparseFedAvg (``bytes_log[round]["upload"|"download"]``), so dense
    and sparse runs are compared on the same measure: the encoded payload of each message.
    """

    def __init__(self, limits: ReplyLimits | None = None, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self._init_guard(limits)
        self.bytes_log: dict[int, dict[str, int]] = {}
        self.last_train_metrics: MetricRecord | None = None
        self._sent: dict[str, dict[int, int]] = {"train": {}, "evaluate": {}}
        self._global: dict[str, torch.Tensor] = {}

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        messages = list(super().configure_train(server_round, arrays, config, grid))
        sizes = {
            int(m.metadata.dst_node_id): arrayrecord_bytes(
                m.content.array_records[self.arrayrecord_key]
            )
            for m in messages
        }
        self._sent["train"] = sizes
        self._global = dict(arrays.to_torch_state_dict())
        self.bytes_log[server_round] = {"upload": 0, "download": sum(sizes.values())}
        return messages

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        messages = list(super().configure_evaluate(server_round, arrays, config, grid))
        self._sent["evaluate"] = {int(m.metadata.dst_node_id): 0 for m in messages}
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        up = sum(
            arrayrecord_bytes(rec)
            for m in replies
            if not m.has_error()
            for rec in m.content.array_records.values()
        )
        row = self.bytes_log.setdefault(server_round, {"upload": 0, "download": 0})
        row["upload"] = up
        spec = ModelSpec.from_state(self._global, {}, max_abs=self.limits.max_abs)
        wire = spec.wire()
        accepted, verdicts = validate_replies(
            replies,
            self._sent["train"],
            lambda m: decode_dense(m, wire),
            spec,
            self._global,
            self.limits,
            self.norm_bound,
        )
        uploads: dict[int, int] = {}
        for m in replies:
            if not m.has_error():
                node = int(m.metadata.src_node_id)
                size = sum(arrayrecord_bytes(r) for r in m.content.array_records.values())
                uploads[node] = uploads.get(node, 0) + size
        self._record_train(server_round, verdicts, self._sent["train"], uploads)
        # Accepted replies reduced to their checked arrays and the shared metric keys.
        where = [i for i, v in enumerate(verdicts) if v.accepted]
        shared = common_keys(  # wall-clock keys stay per client (guard._metrics)
            [
                {k: x for k, x in verdicts[i].metrics.items() if k not in PER_CLIENT_KEYS}
                for i in where
            ]
        )
        clean = [
            _with_content(
                replies[i],
                RecordDict(
                    {
                        self.arrayrecord_key: ArrayRecord({k: u.values[k] for k in self._global}),
                        "metrics": MetricRecord(m),  # type: ignore[arg-type]
                    }
                ),
            )
            for i, u, m in zip(where, accepted, shared, strict=True)
        ]
        arrays, metrics = super().aggregate_train(server_round, clean) if clean else (None, None)
        metrics = MetricRecord() if metrics is None else metrics
        if arrays is not None:
            problem = self._merged_problem(dict(arrays.to_torch_state_dict()))
            if problem is not None:
                self._reject_round(server_round, problem, metrics)
                arrays = None
        metrics["upload_bytes"] = up
        metrics["download_bytes"] = row["download"]
        metrics["num_rejected"] = sum(1 for v in verdicts if not v.accepted)
        metrics["num_accepted"] = len(accepted)
        metrics["density"] = 1.0
        self.last_train_metrics = metrics
        return arrays, metrics

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        replies = list(replies)
        return self._check_evaluate(
            server_round, replies, self._sent["evaluate"], self.evaluate_metrics_aggr_fn
        )
