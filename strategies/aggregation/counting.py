"""Flower's stock FedAvg with byte counting only: the dense baseline, its maths untouched."""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg


def arrayrecord_bytes(record: ArrayRecord) -> int:
    """Bytes of the serialized arrays Flower puts on the wire for this record."""
    return sum(len(array.data) for array in record.values())


def eval_rows(replies: list[Message]) -> list[dict[str, object]]:
    """Each evaluate reply's node and its numeric metrics (per-client accuracy-matrix rows)."""
    rows: list[dict[str, object]] = []
    for m in replies:
        if m.has_error():
            continue
        metrics = {
            k: float(v)
            for rec in m.content.metric_records.values()
            for k, v in rec.items()
            if isinstance(v, int | float)
        }
        rows.append({"node_id": int(m.metadata.src_node_id), "metrics": metrics})
    return rows


class ByteCountingFedAvg(FedAvg):
    """``flwr.serverapp.strategy.FedAvg`` that logs payload bytes per round in both directions.

    Counting mirrors SparseFedAvg (``bytes_log[round]["upload"|"download"]``), so dense
    and sparse runs are compared on the same measure: the encoded payload of each message.
    """

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.bytes_log: dict[int, dict[str, int]] = {}
        self.last_train_metrics: MetricRecord | None = None
        self.round_eval_clients: dict[int, list[dict[str, object]]] = {}

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        messages = list(super().configure_train(server_round, arrays, config, grid))
        down = sum(
            arrayrecord_bytes(m.content.array_records[self.arrayrecord_key]) for m in messages
        )
        self.bytes_log[server_round] = {"upload": 0, "download": down}
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
        arrays, metrics = super().aggregate_train(server_round, replies)
        metrics = MetricRecord() if metrics is None else metrics
        metrics["upload_bytes"] = up
        metrics["download_bytes"] = row["download"]
        metrics["num_rejected"] = sum(1 for m in replies if m.has_error())
        metrics["density"] = 1.0
        self.last_train_metrics = metrics
        return arrays, metrics

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        replies = list(replies)
        self.round_eval_clients[server_round] = eval_rows(replies)
        return super().aggregate_evaluate(server_round, replies)
