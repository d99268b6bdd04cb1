"""SecAggSparseFedAvg: SparseFedAvg whose train round is a SecAgg+ secure sum (Bell et al. 2020).

Only the train hooks change, and Flower's own ``Strategy.start`` loop still runs the
rounds: ``configure_train`` samples and encodes as SparseFedAvg does, then runs the
advertise-keys and share-keys stages as extra message exchanges on the same Grid and
attaches to each train message the key shares addressed to that node; the train
replies are masked vectors; ``aggregate_train`` runs the unmask stage and reads the
sum with `strategies.secure.sparse_sum` (the mask-aware mean on the public consensus
mask and the consensus vote). The server never holds one client's update, mask,
weight or loss in clear: it sees public keys, ciphertexts, masked vectors, and at
unmasking the shares needed to remove the masks of the sum.

A round aborts, keeping the previous global model, when fewer nodes than a share
threshold survive a stage; the reason goes to ``self.aborts``, to every client row of
the round and to the round metric ``secagg_aborted``. Wire layout: `secagg_wire`; the
round transcript and the checks of the key-stage replies: `secagg_round`.
"""

from __future__ import annotations

from collections.abc import Iterable
from logging import INFO, WARNING
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.supercore import log

from strategies.aggregation import secagg_wire as W
from strategies.aggregation.merge import consensus_from_votes
from strategies.aggregation.secagg_round import (
    Round,
    RoundAborted,
    SumPlan,
    collect_shares,
    exchange,
    read_keys,
    read_shares,
)
from strategies.aggregation.strategy import SparseFedAvg
from strategies.secure import protocol as P
from strategies.secure.crypto import SecAggError
from strategies.secure.sparse_sum import SecureSum, SparseSumPlan

__all__ = ["RoundAborted", "SecAggSparseFedAvg"]


class SecAggSparseFedAvg(SparseFedAvg):
    """SparseFedAvg with SecAgg+ secure summation of sparse updates on the Message API."""

    screens_replies = False  # masked inputs are unmasked as a sum, never decoded one by one

    def __init__(
        self,
        *,
        threshold: float = 0.5,
        clip: float = 1.0,
        quant_bits: int = 16,
        max_weight: int = 4096,
        neighbors: int = 0,
        stage_timeout: float = 600.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        P.threshold_for(2, threshold)  # validates the fraction
        if self.merge_rule_name != "mean":
            raise ValueError("secure aggregation computes the mask-aware mean only")
        self.threshold, self.clip, self.quant_bits = threshold, clip, quant_bits
        self.max_weight, self.neighbors, self.stage_timeout = max_weight, neighbors, stage_timeout
        self.aborts: list[dict[str, int | str]] = []
        self.last_secure_sum: SecureSum | None = None
        self._grid: Grid | None = None
        self._round: Round | None = None
        self._inbox: dict[int, dict[int, bytes]] = {}  # dst -> src -> ciphertext, this round

    def summary(self) -> None:
        """Log the secure-aggregation settings, then SparseFedAvg's summary."""
        log(
            INFO,
            "\t├──> SecAgg+: threshold %.2f, neighbours %s, clip %g, %d-bit quantization",
            self.threshold,
            self.neighbors or "all",
            self.clip,
            self.quant_bits,
        )
        super().summary()

    # ------------------------------------------------------------------ stages
    def _exchange(
        self, grid: Grid, rs: Round, action: str, records: dict[int, ConfigRecord]
    ) -> dict[int, ConfigRecord]:
        """Send one stage record per node; return the well-formed replies by node."""
        return exchange(grid, rs, action, records, self.stage_timeout)

    def _advertise_and_share(self, grid: Grid, rs: Round, nodes: list[int]) -> None:
        """Stages 0 and 1: collect public keys, build the graph, collect encrypted shares."""
        replies = self._exchange(
            grid, rs, W.ADVERTISE, {n: ConfigRecord({"round": rs.round}) for n in nodes}
        )
        read_keys(rs, replies)
        u0 = sorted(rs.c_pks)
        if len(u0) < 2:
            raise RoundAborted(f"{len(u0)} node(s) advertised keys; at least 2 needed")
        graph = P.neighbour_graph(u0, self.neighbors, seed=self.seed * 7919 + rs.round)
        for node in u0:
            rs.groups[node] = tuple(sorted((node, *graph[node])))
            rs.thresholds[node] = P.threshold_for(len(rs.groups[node]), self.threshold)
        records = {
            node: ConfigRecord(
                {
                    "round": rs.round,
                    "threshold": rs.thresholds[node],
                    "ids": P.ids_to_bytes(rs.groups[node]),
                    "c-pks": [rs.c_pks[j] for j in rs.groups[node]],
                    "s-pks": [rs.s_pks[j] for j in rs.groups[node]],
                }
            )
            for node in u0
        }
        self._inbox = {node: {} for node in u0}
        read_shares(rs, self._exchange(grid, rs, W.SHARE, records), self._inbox)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """SparseFedAvg's train messages, preceded by key advertisement and key sharing."""
        messages = list(super().configure_train(server_round, arrays, config, grid))
        rs = Round(round=server_round)
        self._grid, self._round = grid, rs
        if not messages:
            return []
        nodes = sorted(int(m.metadata.dst_node_id) for m in messages)
        try:
            self._advertise_and_share(grid, rs, nodes)
        except RoundAborted as exc:
            self._abort(rs, str(exc))
            return []
        assert self.mask is not None and self._global is not None
        floats = {k: tuple(v.shape) for k, v in self._global.items() if v.is_floating_point()}
        rs.plan = self._plan(rs, floats, len(messages))
        out: list[Message] = []
        for msg in messages:
            node = int(msg.metadata.dst_node_id)
            if node not in rs.u1:
                continue
            inbox = {j: ct for j, ct in self._inbox[node].items() if j in rs.u1}
            rec = ConfigRecord(
                {
                    "round": server_round,
                    "u1": P.ids_to_bytes(j for j in rs.groups[node] if j in rs.u1),
                    "src": P.ids_to_bytes(inbox),
                    "full": int(rs.plan.full),
                    "clip": float(self.clip),
                    "quant-bits": self.quant_bits,
                    "max-weight": self.max_weight,
                    "num-clients": len(rs.u1),
                    **self._plan_fields(rs, len(messages)),
                }
            )
            if inbox:
                rec["ct"] = list(inbox.values())
            rs.stage_bytes[node] = rs.stage_bytes.get(node, 0) + W.record_bytes(rec)
            msg.content[W.RECORD] = rec
            msg.content.config_records["config"][W.MODE_KEY] = "secagg"
            out.append(msg)
        return out

    def _plan(self, rs: Round, floats: dict[str, tuple[int, ...]], sampled: int) -> SumPlan:
        """The round's public sum plan (a subclass may sum something else, e.g. noised updates)."""
        assert self.mask is not None
        return SparseSumPlan(
            floats,
            {k: m for k, m in self.mask.items() if k in floats},
            full=self._readjust_round(rs.round),
            clip=self.clip,
            quant_bits=self.quant_bits,
            max_weight=self.max_weight,
            num_clients=len(rs.u1),
        )

    def _plan_fields(self, rs: Round, sampled: int) -> dict[str, int | float]:
        """Extra public plan entries of the train record (none here)."""
        return {}

    def _readjust_round(self, server_round: int) -> bool:
        """A mask round on which clients also readjust their masks (FedDST stops at R_end).

        `SparseFedAvg` also re-votes on round R_end itself, after which no client has
        pruned or regrown (`client.local.readjust_fraction`); a secure vote would then
        only cost bytes, so the last such round stays a values-only round.
        """
        end = self.mask_update_end_round
        return self._mask_round(server_round) and (end is None or server_round < end)

    # ------------------------------------------------------------------ aggregation
    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Unmask the sum of the masked replies; mean on the consensus mask; re-vote it."""
        replies = list(replies)
        rs = self._round
        if rs is None or rs.round != server_round:
            raise RuntimeError("aggregate_train called before configure_train")
        if rs.aborted:  # aborted before any train message went out
            return None, self._finish(server_round, replies, rs, set())
        layout = rs.plan.layout() if rs.plan else None
        masked: dict[int, np.ndarray] = {}
        for msg in replies:
            node = int(msg.metadata.src_node_id)
            if node not in rs.u1 or node in masked:
                rs.failed.setdefault(node, "unexpected or duplicate masked input")
                continue
            if msg.has_error():
                rs.failed[node] = f"dropped after key sharing (error {msg.error.code})"
                continue
            rec = W.stage_record(msg.content)
            try:
                assert layout is not None
                if rec is None:
                    raise ValueError("no secagg record in the train reply")
                data = W.get_bytes(rec, "masked")
                rs.upload[node] = rs.upload.get(node, 0) + len(data)
                vector = layout.unpack(data)
            except (ValueError, SecAggError) as exc:
                rs.failed[node] = f"masked input: {exc}"
                continue
            problem = self._plaintext_problem(rs, node, msg)
            if problem is not None:  # left out of the sum: recovered as a dropout
                rs.failed[node] = problem
                continue
            masked[node] = vector
        for node in rs.u1 - set(masked):
            rs.failed.setdefault(node, "dropped after key sharing (no masked input)")
        try:
            total = self._unmask(rs, masked)
        except (RoundAborted, SecAggError) as exc:
            self._abort(rs, str(exc))
            return None, self._finish(server_round, replies, rs, set())
        assert rs.plan is not None and self._global is not None and self.mask is not None
        result = rs.plan.decode(total, self._global)
        self.last_secure_sum = result
        merged = dict(self._global) | result.values
        mask_changed = 0
        if rs.plan.full:
            new_mask = consensus_from_votes(
                result.votes,
                self.target_densities,
                merged,
                self.structure or None,
                self.unit_rows or None,
            )
            if any(not torch.equal(new_mask[k], self.mask[k]) for k in self.mask):
                self.mask, self.mask_version, mask_changed = new_mask, self.mask_version + 1, 1
        new_state = {
            k: torch.where(self.mask[k], v, torch.zeros_like(v)) if k in self.mask else v
            for k, v in merged.items()
        }
        metrics = self._finish(server_round, replies, rs, set(masked))
        on_mask = rs.plan.layout().segments[0].length
        metrics["train_loss"] = result.train_loss
        metrics["mask_changed"] = mask_changed
        metrics["secure_clipped_fraction"] = result.clipped / max(1, on_mask * len(masked))
        self.last_train_metrics = metrics
        return ArrayRecord({k: new_state[k] for k in self._global}), metrics

    def _plaintext_problem(self, rs: Round, node: int, msg: Message) -> str | None:
        """Why the clear part of a masked reply is refused, or None (a subclass that expects
        a plaintext record beside the masked vector checks it here; none is read here)."""
        return None

    def _unmask(self, rs: Round, masked: dict[int, np.ndarray]) -> np.ndarray:
        """Stage 3: check thresholds, collect shares from survivors, remove the masks."""
        dropped = sorted(rs.u1 - set(masked))
        for node in list(masked) + dropped:  # every secret the sum needs
            alive = len(set(rs.groups[node]) & set(masked))
            if alive < rs.thresholds[node]:
                raise RoundAborted(
                    f"{len(masked)} of {len(rs.u1)} nodes sent masked inputs; node {node}'s "
                    f"secrets need {rs.thresholds[node]} surviving group members, {alive} left"
                )
        records = {
            node: ConfigRecord(
                {
                    "round": rs.round,
                    "survivors": P.ids_to_bytes(sorted(masked)),
                    "dropped": P.ids_to_bytes(dropped),
                }
            )
            for node in masked
        }
        replies = self._exchange(self._grid_or_fail(), rs, W.UNMASK, records)
        shares = collect_shares(rs, replies, set(masked))
        return P.unmask_sum(rs.round, masked, rs.groups, rs.thresholds, rs.s_pks, rs.u1, shares)

    def _grid_or_fail(self) -> Grid:
        if self._grid is None:
            raise RuntimeError("aggregate_train called before configure_train")
        return self._grid

    def _abort(self, rs: Round, reason: str) -> None:
        self.aborts.append({"round": rs.round, "reason": reason})
        rs.aborted = reason
        log(WARNING, "secure aggregation round %d aborted: %s", rs.round, reason)

    def _finish(
        self, server_round: int, replies: list[Message], rs: Round, accepted: set[int]
    ) -> MetricRecord:
        """Bytes, per-client rows and round metrics; the same bookkeeping as SparseFedAvg."""
        sent = dict(self._sent["train"])
        self._settle("train", replies)
        abort_reason = rs.aborted
        uploads = dict(rs.upload)
        for node, n in rs.stage_bytes.items():
            self._sent_bytes[node] = self._sent_bytes.get(node, 0) + n
            self._log_bytes(server_round, "download", n)
        self._log_bytes(server_round, "upload", sum(uploads.values()))
        failed = dict(rs.failed)
        rejected = [
            (node, f"secure aggregation aborted: {abort_reason}" if abort_reason else why)
            for node, why in ({n: failed.get(n, "rejected") for n in sent} | failed).items()
            if node not in accepted or abort_reason
        ]
        for node, reason in rejected:
            self.rejections.append({"round": server_round, "node_id": node, "reason": reason})
        rows = self._client_rows(
            replies, sent, uploads, rejected, set() if abort_reason else accepted
        )
        for client in rows:  # say why each node left the round, not just "no reply"
            node = int(client["node_id"])  # type: ignore[call-overload]
            if abort_reason:
                extra = f" ({failed[node]})" if node in failed else ""
                client["reason"] = f"secure aggregation aborted: {abort_reason}{extra}"
            elif not client["accepted"] and node in failed:
                client["reason"] = failed[node]
        self.round_clients[server_round] = rows
        row = self.bytes_log.setdefault(
            server_round, {"upload": 0, "download": 0, "download_evaluate": 0}
        )
        assert self.mask is not None
        active = sum(int(m.sum()) for m in self.mask.values())
        total = sum(m.numel() for m in self.mask.values())
        metrics = MetricRecord(
            {
                "upload_bytes": row["upload"],
                "download_bytes": row["download"],
                "num_rejected": len(rejected),
                "num_accepted": 0 if abort_reason else len(accepted),
                "density": active / total if total else 1.0,
                "mask_changed": 0,
                "secagg_aborted": int(abort_reason is not None),
                "secure_dropped": len(rs.u1 - accepted),
            }
        )
        self.last_train_metrics = metrics
        return metrics
