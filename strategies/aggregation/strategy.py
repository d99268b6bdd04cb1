"""SparseFedAvg: FedAvg with codec-encoded sparse messages, validated replies, FedDST masks.

Only single hooks are overridden (configure_train, aggregate_train, configure_evaluate,
aggregate_evaluate, summary); Flower's own ``Strategy.start`` loop runs the rounds. The
loop's ``arrays`` stays the DENSE global model (zeros off the consensus mask), so
``evaluate_fn`` and result handling work unchanged.

Wire format: `strategies.aggregation.wire` (messages, records and every "leanfed.*" config
key the server sends).

Bytes are counted from encoded payload lengths: ``self.bytes_log[round]`` holds "upload"
(sum over train replies), "download" (sum over train messages) and "download_evaluate".
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from logging import INFO
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import sample_nodes
from flwr.supercore import log

from strategies import codec
from strategies.aggregation.early import EarlyScreen
from strategies.aggregation.guard import ReplyGuard
from strategies.aggregation.merge import ClientUpdate, MergeOptions, MergeRule
from strategies.aggregation.rules import (
    VOTE_RULES,
    AggregationRule,
    RoundInput,
    VoteRule,
    as_rule,
    build_rule,
    build_vote,
)
from strategies.aggregation.sparse_round import (
    check_mask,
    check_merged,
    initial_mask,
    masked,
    reply_spec,
    upload_bytes,
)
from strategies.aggregation.validate import ModelSpec, ReplyLimits, validate_replies
from strategies.aggregation.wire import (
    Decoded,
    decode_payload,
    decode_reply,
    encode_global,
)
from strategies.sparse.density import layer_density_rule
from strategies.sparse.masks import Mask

__all__ = ["VOTES", "SparseFedAvg", "decode_reply", "encode_global"]

Decoder = Callable[[Message], Decoded]

# Built-in consensus-mask votes (strategies.aggregation.rules.VOTE_RULES; plug-ins too):
# "weighted" = FedDST's examples-weighted vote, ties by |merged value|;
# "robust" = weights capped at the median client's, ties by the previous mask then index.
VOTES = tuple(VOTE_RULES.builtin_names())


class SparseFedAvg(ReplyGuard, FedAvg):
    """FedAvg over sparse, codec-encoded models with a FedDST consensus mask (Bibikar et al. 2022).

    Round r: send the global values under the consensus mask (the mask itself only to
    nodes that do not hold it yet); validate and decode the replies (`validate`, under
    `limits`), dropping bad ones into ``self.rejections`` with their reasons; merge with
    `merge_rule` (its knobs in `merge_options`; a merged model that is not finite is
    refused: the round is rejected); every `mask_update_interval` rounds (until
    `mask_update_end_round`) re-vote the mask (`vote`: see VOTES); the new global model is
    the merged values with everything off the consensus mask zeroed.
    """

    screens_replies = True  # observe_reply screens train replies for validate_replies

    def __init__(  # noqa: PLR0913 - the knobs are the run config
        self,
        *,
        density: float = 0.1,
        distribution: str = "erk",
        upload_dtype: str = "fp32",
        download_dtype: str = "fp32",
        merge_rule: str | MergeRule | AggregationRule = "mean",
        trim: float = 0.2,
        merge_options: MergeOptions | None = None,
        rule_options: dict[str, bool | int | float | str] | None = None,
        vote: str | VoteRule = "weighted",
        mask_update_interval: int = 1,
        mask_update_end_round: int | None = None,
        max_density_tolerance: float = 0.05,
        max_density: float | None = None,
        seed: int = 0,
        sparse_keys: Iterable[str] | None = None,
        initial_mask: Mask | None = None,
        fraction_train: float = 1.0,
        fraction_evaluate: float = 1.0,
        min_train_nodes: int = 2,
        min_evaluate_nodes: int = 2,
        min_available_nodes: int = 2,
        train_metrics_aggr_fn: Callable[[list[RecordDict], str], MetricRecord] | None = None,
        evaluate_metrics_aggr_fn: Callable[[list[RecordDict], str], MetricRecord] | None = None,
        limits: ReplyLimits | None = None,
        structure: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(
            fraction_train=fraction_train,
            fraction_evaluate=fraction_evaluate,
            min_train_nodes=min_train_nodes,
            min_evaluate_nodes=min_evaluate_nodes,
            min_available_nodes=min_available_nodes,
            train_metrics_aggr_fn=train_metrics_aggr_fn,
            evaluate_metrics_aggr_fn=evaluate_metrics_aggr_fn,
        )
        if not 0.0 < density <= 1.0:
            raise ValueError(f"density must be in (0, 1], got {density}")
        for what, dt in (("upload_dtype", upload_dtype), ("download_dtype", download_dtype)):
            if dt not in codec.VALUE_DTYPES:
                raise ValueError(f"{what} must be one of {codec.VALUE_DTYPES}, got {dt!r}")
        if mask_update_interval < 1:
            raise ValueError(f"mask_update_interval must be >= 1, got {mask_update_interval}")
        if max_density_tolerance < 0:
            raise ValueError(f"max_density_tolerance must be >= 0, got {max_density_tolerance}")
        self.density = density
        self.distribution = distribution
        self._density_rule = layer_density_rule(distribution)
        self.upload_dtype = upload_dtype
        self.download_dtype = download_dtype
        run_options = merge_options if merge_options is not None else MergeOptions(trim=trim)
        # The plug-in rule (stateless function or stateful object) and the mask vote.
        self.rule: AggregationRule = (
            build_rule(merge_rule, rule_options, run_options)
            if isinstance(merge_rule, str) or rule_options
            else as_rule(merge_rule)
        )
        self.vote_name = vote if isinstance(vote, str) else repr(vote)
        self.vote: VoteRule = build_vote(vote)
        self.merge_rule_name = merge_rule if isinstance(merge_rule, str) else repr(self.rule)
        self.mask_update_interval = mask_update_interval
        self.mask_update_end_round = mask_update_end_round
        self.max_density_tolerance = max_density_tolerance
        # Replies denser than this (+ tolerance) are rejected; default: the target density
        # (or the consensus mask's actual density, if rounding made it larger).
        self.max_density = max_density
        self.seed = seed
        self.sparse_keys = None if sparse_keys is None else list(sparse_keys)
        self.mask: Mask | None = None if initial_mask is None else dict(initial_mask)
        # Structured DST (strategies.sparse.structured_rules.layer_structures): the vote keeps
        # whole units per "channel" layer, k inputs per unit per "fanin" layer, N per M.
        self.structure: dict[str, str] = dict(structure or {})
        self.unit_rows: dict[str, torch.Tensor] = {}  # multi-row units (heads): their rows
        self.target_densities: dict[str, float] = {}
        self.mask_version = 0
        self._init_guard(limits)  # rejections, round_clients, round_eval_clients, ...
        self.bytes_log: dict[int, dict[str, int]] = {}
        self.last_train_metrics: MetricRecord | None = None
        self._sent_bytes: dict[int, int] = {}
        self._node_version: dict[int, int] = {}  # mask version each node is known to hold
        self._sent: dict[str, dict[int, int]] = {"train": {}, "evaluate": {}}
        self._global: dict[str, torch.Tensor] | None = None  # dense global sent this round
        self.early = EarlyScreen()  # train replies screened as they arrived (observe_reply)

    # ------------------------------------------------------------------ helpers
    def summary(self) -> None:
        """Log the sparse settings, then FedAvg's summary."""
        log(
            INFO,
            "\t├──> Sparse: density %.3f (%s), merge %s, %s vote, mask every %d round(s)",
            self.density,
            self.distribution,
            self.merge_rule_name,
            self.vote_name,
            self.mask_update_interval,
        )
        log(INFO, "\t├──> Codec: upload %s | download %s", self.upload_dtype, self.download_dtype)
        super().summary()

    def _ensure_mask(self, state: dict[str, torch.Tensor]) -> Mask:
        """Build the initial ERK/uniform random mask over `sparse_keys` on first use (seeded)."""
        if self.mask is None:
            self.mask = initial_mask(
                state,
                self.sparse_keys,
                self.density,
                self._density_rule,
                self.seed,
                self.structure,
                self.unit_rows,
            )
        for k, m in self.mask.items():
            if k not in state or tuple(m.shape) != tuple(state[k].shape):
                raise ValueError(f"mask entry {k!r} does not match the model")
        if not self.target_densities:
            self.target_densities = {k: int(m.sum()) / m.numel() for k, m in self.mask.items()}
        return self.mask

    def _mask_round(self, server_round: int) -> bool:
        end = self.mask_update_end_round
        return server_round % self.mask_update_interval == 0 and (
            end is None or server_round <= end
        )

    def _configure(
        self,
        kind: str,
        server_round: int,
        arrays: ArrayRecord,
        config: ConfigRecord,
        grid: Grid,
        fraction: float,
        min_nodes: int,
    ) -> list[Message]:
        if fraction == 0.0:
            return []
        num_nodes = int(len(list(grid.get_node_ids())) * fraction)
        node_ids, num_total = sample_nodes(
            grid, self.min_available_nodes, max(num_nodes, min_nodes)
        )
        log(INFO, "configure_%s: Sampled %s nodes (out of %s)", kind, len(node_ids), len(num_total))
        state = dict(arrays.to_torch_state_dict())
        mask = self._ensure_mask(state)
        if kind == "train":  # what the clients actually receive: zeros off the mask
            self._global = masked(state, mask)
            self.early.clear()
        payloads: dict[bool, ArrayRecord] = {}
        sizes: dict[bool, int] = {}
        messages: list[Message] = []
        sent: dict[int, int] = {}
        for node in node_ids:
            send_mask = self._node_version.get(node) != self.mask_version
            own = self._node_payload(kind, server_round, node, state, mask)
            if own is None and send_mask not in payloads:
                payloads[send_mask] = encode_global(state, mask, send_mask, self.download_dtype)
                sizes[send_mask] = len(codec.from_arrayrecord(payloads[send_mask]))
            cfg = ConfigRecord(dict(config))
            cfg["server-round"] = server_round
            cfg["leanfed.mask-sent"] = int(send_mask)
            cfg["leanfed.mask-version"] = self.mask_version
            cfg["leanfed.density"] = float(self.density)
            cfg["leanfed.upload-dtype"] = self.upload_dtype
            cfg["leanfed.mask-round"] = int(self._mask_round(server_round))
            record, size, version = payloads.get(send_mask), sizes.get(send_mask, 0), None
            if own is not None:  # a per-node payload (condensed sub-network): its own config
                record, size, extra = own
                cfg.update(extra)
                version = self._node_version.get(node, -1)  # the node's full mask is unchanged
            assert record is not None
            content = RecordDict({self.arrayrecord_key: record, self.configrecord_key: cfg})
            msg_type = MessageType.TRAIN if kind == "train" else MessageType.EVALUATE
            messages.append(Message(content, node, msg_type, group_id=str(server_round)))
            sent[node] = self.mask_version if version is None else version
            if kind == "train":
                self._sent_bytes[node] = size
            log_key = "download" if kind == "train" else "download_evaluate"
            self._log_bytes(server_round, log_key, size)
        self._sent[kind] = sent
        return messages

    def _node_payload(
        self, kind: str, server_round: int, node: int, state: dict[str, torch.Tensor], mask: Mask
    ) -> tuple[ArrayRecord, int, dict[str, Any]] | None:
        """A payload of this node's own (record, bytes, extra config), or None for the shared
        global payload. Hook for subclasses (``condensed.CondensedSparseFedAvg``)."""
        return None

    def observe_reply(self, msg: Message) -> None:
        """Screen a train reply as it arrives (`early`); a grid that streams replies calls
        this for each, and ``aggregate_train`` then finds its decode and checks done."""
        previous, mask = self._global, self.mask
        if self.screens_replies and previous is not None and mask is not None:

            def setup() -> tuple[Decoder, ModelSpec]:
                spec = self._spec(previous, mask)
                return self._decoder(mask, spec.wire()), spec

            self.early.add(msg, (previous, mask), setup)

    def _decoder(self, mask: Mask, wire_spec: dict[str, codec.TensorSpec]) -> Decoder:
        """How a train reply is decoded into full-shape (values, mask): the codec payload
        under the mask sent this round. Hook for subclasses."""
        return lambda m: decode_payload(m, mask, wire_spec)

    def _prepare(self, accepted: list[ClientUpdate]) -> list[ClientUpdate]:
        """The accepted updates as the merge rule sees them (after validation). Hook."""
        return accepted

    def _log_bytes(self, server_round: int, key: str, n: int) -> None:
        row = self.bytes_log.setdefault(
            server_round, {"upload": 0, "download": 0, "download_evaluate": 0}
        )
        row[key] += n

    def _settle(self, kind: str, replies: list[Message]) -> None:
        """Record which nodes now hold which mask version; forget nodes that failed."""
        sent = self._sent[kind]
        ok = {int(m.metadata.src_node_id) for m in replies if not m.has_error()}
        for node, version in sent.items():
            if node in ok:
                self._node_version[node] = version
            else:  # unknown state: send the full mask next time
                self._node_version.pop(node, None)
        self._sent[kind] = {}

    # ------------------------------------------------------------------ hooks
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Send each sampled node the global model under the consensus mask (codec payload)."""
        return self._configure(
            "train", server_round, arrays, config, grid, self.fraction_train, self.min_train_nodes
        )

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Send each sampled node the global model for evaluation, encoded like training."""
        return self._configure(
            "evaluate",
            server_round,
            arrays,
            config,
            grid,
            self.fraction_evaluate,
            self.min_evaluate_nodes,
        )

    def _spec(self, previous: dict[str, torch.Tensor], mask: Mask) -> ModelSpec:
        """Acceptable replies (see `sparse_round.reply_spec`)."""
        return reply_spec(
            previous,
            mask,
            self.density,
            self.max_density,
            self.max_density_tolerance,
            self.target_densities,
            self.limits.max_abs,
        )

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate, merge and re-vote the mask; return the dense global model and metrics."""
        if self._global is None or self.mask is None:
            raise RuntimeError("aggregate_train called before configure_train")
        replies = list(replies)
        sent = dict(self._sent["train"])
        self._settle("train", replies)
        previous, mask = self._global, self.mask
        spec = self._spec(previous, mask)
        wire_spec = spec.wire()
        limit = codec.max_payload_bytes(wire_spec)
        uploads = upload_bytes(replies, limit)
        self._log_bytes(server_round, "upload", sum(uploads.values()))
        accepted, verdicts = validate_replies(
            replies,
            sent,
            self._decoder(mask, wire_spec),
            spec,
            previous,
            self.limits,
            self.norm_bound,
            lambda node, metrics: self._metrics_problem(server_round, node, metrics),
            screened=self.early.take((previous, mask)),
        )
        self.early.clear()
        self._record_train(server_round, verdicts, self._sent_bytes, uploads)
        self._sent_bytes = {}

        row = self.bytes_log[server_round]
        metrics = self._metrics(self.train_metrics_aggr_fn, verdicts)
        if "density" in metrics:
            metrics["client_density"] = metrics.pop("density")
        mask_changed = 0
        arrays: ArrayRecord | None = None
        if accepted:
            accepted = self._prepare(accepted)
            rnd = RoundInput(
                server_round, dict(mask), previous, accepted, self.structure, self.unit_rows
            )
            merged = self.rule.aggregate(rnd)
            check_merged(merged, previous, self.merge_rule_name)
            problem = self._merged_problem(merged)
            if problem is not None:
                self._reject_round(server_round, problem, metrics)
            else:
                if self._mask_round(server_round):
                    new_mask = self._next_mask(rnd, merged)
                    if any(not torch.equal(new_mask[k], mask[k]) for k in mask):
                        self.mask = new_mask
                        self.mask_version += 1
                        mask_changed = 1
                assert self.mask is not None
                new_state = masked(merged, self.mask)
                arrays = ArrayRecord({k: new_state[k] for k in previous})
        active = sum(int(m.sum()) for m in self.mask.values())
        total = sum(m.numel() for m in self.mask.values())
        metrics["upload_bytes"] = row["upload"]
        metrics["download_bytes"] = row["download"]
        metrics["num_rejected"] = sum(1 for v in verdicts if not v.accepted)
        metrics["num_accepted"] = len(accepted)
        metrics["density"] = active / total if total else 1.0
        metrics["mask_changed"] = mask_changed
        self.last_train_metrics = metrics  # read by the server's per-round recorder
        return arrays, metrics

    def _metrics_problem(
        self, server_round: int, node: int, metrics: dict[str, int | float]
    ) -> str | None:
        """Why a train reply's checked metrics are refused by this strategy (none here)."""
        return None

    def _next_mask(self, rnd: RoundInput, merged: dict[str, torch.Tensor]) -> Mask:
        """The rule's proposal if it makes one, else the vote; checked against the mask."""
        proposed = self.rule.propose_mask(rnd, merged, self.target_densities)
        new = proposed if proposed is not None else self.vote(rnd, merged, self.target_densities)
        return check_mask(new, rnd.mask, self.merge_rule_name)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Track which nodes now hold the mask; validate; weighted average of checked metrics."""
        replies = list(replies)
        sent = dict(self._sent["evaluate"])
        self._settle("evaluate", replies)
        return self._check_evaluate(server_round, replies, sent, self.evaluate_metrics_aggr_fn)
