"""The ClientApp's side of SecAgg+: key stages as query handlers, and the masked train reply.

The node's secrets (X25519 secret keys, self-mask seed, the shares it holds) live only in
its own ``context.state`` under ``STATE``, for one round: answering the unmask request
deletes them, so a second request (e.g. asking for the other kind of share) is refused.
Record layout: `strategies.aggregation.secagg_wire`; maths: `strategies.secure`.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict

from strategies.aggregation import secagg_wire as W
from strategies.privacy.accountant import adaptive_value_noise
from strategies.privacy.distributed import DPSumPlan, client_noise_std, min_survivors
from strategies.secure import protocol as P
from strategies.secure.crypto import KEY_BYTES, SecAggError
from strategies.secure.sparse_sum import SparseSumPlan
from strategies.sparse.masks import Mask
from tasks.config import LeanfedConfig

STATE = "leanfed.secagg"
MAX_IDS = 100_000  # refuse larger id lists before allocating
MIN_NOISE_KEY = "dp-min-noise-multiplier"  # a site's own floor on z (its --node-config)


def _save(context: Context, st: P.ClientState, c_pks: dict[int, bytes]) -> None:
    group = list(st.group)
    rec = ConfigRecord(
        {
            "round": st.round,
            "node": P.ids_to_bytes([st.node]),
            "c-sk": st.c_sk,
            "s-sk": st.s_sk,
            "b": st.b,
            "group": P.ids_to_bytes(group),
            "threshold": st.threshold,
            "held": P.ids_to_bytes(st.held),
        }
    )
    if group:
        rec["s-pks"] = [st.s_pks[j] for j in group]
        rec["c-pks"] = [c_pks[j] for j in group]
    if st.held:
        rec["held-b"] = [b for b, _ in st.held.values()]
        rec["held-sk"] = [sk for _, sk in st.held.values()]
    context.state.config_records[STATE] = rec


def _load(context: Context, server_round: int) -> tuple[P.ClientState, dict[int, bytes]]:
    rec = context.state.config_records.get(STATE)
    if rec is None or W.get_int(rec, "round") != server_round:
        raise SecAggError(f"no secure-aggregation keys for round {server_round}")
    group = P.ids_from_bytes(W.get_bytes(rec, "group"), MAX_IDS)
    held = P.ids_from_bytes(W.get_bytes(rec, "held"), MAX_IDS)
    s_pks = W.get_bytes_list(rec, "s-pks", len(group))
    c_pks = W.get_bytes_list(rec, "c-pks", len(group))
    hb, hsk = (
        W.get_bytes_list(rec, "held-b", len(held)),
        W.get_bytes_list(rec, "held-sk", len(held)),
    )
    st = P.ClientState(
        round=server_round,
        node=P.ids_from_bytes(W.get_bytes(rec, "node"), 1)[0],
        c_sk=W.get_bytes(rec, "c-sk"),
        s_sk=W.get_bytes(rec, "s-sk"),
        b=W.get_bytes(rec, "b"),
        group=tuple(group),
        s_pks=dict(zip(group, s_pks, strict=True)),
        threshold=W.get_int(rec, "threshold"),
        held={src: (b, sk) for src, b, sk in zip(held, hb, hsk, strict=True)},
    )
    return st, dict(zip(group, c_pks, strict=True))


def _request(msg: Message) -> tuple[ConfigRecord, int]:
    rec = W.stage_record(msg.content)
    if rec is None:
        raise SecAggError("message has no secagg record")
    return rec, W.get_int(rec, "round")


def _reply(msg: Message, rec: ConfigRecord) -> Message:
    return Message(RecordDict({W.RECORD: rec}), reply_to=msg)


def advertise(msg: Message, context: Context) -> Message:
    """Stage 0: fresh key pairs for this round; reply with the two public keys."""
    _, server_round = _request(msg)
    st, c_pk, s_pk = P.advertise(server_round, context.node_id)
    _save(context, st, {})
    return _reply(msg, ConfigRecord({"c-pk": c_pk, "s-pk": s_pk}))


def share(msg: Message, context: Context) -> Message:
    """Stage 1: Shamir-share b and s_sk over the group; one ciphertext per neighbour."""
    rec, server_round = _request(msg)
    st, _ = _load_fresh(context, server_round)
    ids = P.ids_from_bytes(W.get_bytes(rec, "ids"), MAX_IDS)
    c_pks = W.get_bytes_list(rec, "c-pks", len(ids), KEY_BYTES)
    s_pks = W.get_bytes_list(rec, "s-pks", len(ids), KEY_BYTES)
    keys = {j: (c, s) for j, c, s in zip(ids, c_pks, s_pks, strict=True)}
    cts = P.share_keys(st, keys, W.get_int(rec, "threshold"))
    _save(context, st, dict(zip(ids, c_pks, strict=True)))
    out = ConfigRecord({"dst": P.ids_to_bytes(cts)})
    if cts:
        out["ct"] = list(cts.values())
    return _reply(msg, out)


def _load_fresh(context: Context, server_round: int) -> tuple[P.ClientState, dict[int, bytes]]:
    """The keys advertised this round, before any sharing (the share stage runs once)."""
    st, c_pks = _load(context, server_round)
    if st.b:
        raise SecAggError("keys were already shared this round")
    return st, c_pks


def masked_reply(
    msg: Message,
    context: Context,
    received: tuple[dict[str, torch.Tensor], Mask],
    local: dict[str, torch.Tensor],
    local_mask: Mask | None,
    examples: int,
    loss: float,
    dp_record: dict[str, int | float] | None = None,
) -> Message:
    """Stage 2: decrypt the shares sent to this node, then reply with the masked vector.

    `received`: the global values and consensus mask this round's train message carried.
    `dp_record`: under record-level DP, this site's epsilon(delta) so far, its rounds trained
    and its example count; they go in clear beside the masked vector, as the reply's only
    metrics (`metric_rules.DP_RECORD_RULES`): the epsilon is a public function of the run
    config and the other two, which the server recomputes it from.
    """
    rec, server_round = _request(msg)
    st, c_pks = _load(context, server_round)
    srcs = P.ids_from_bytes(W.get_bytes(rec, "src"), MAX_IDS)
    cts = W.get_bytes_list(rec, "ct", len(srcs))
    P.receive_shares(st, dict(zip(srcs, cts, strict=True)), c_pks)
    global_values, consensus = received
    floats = {k: tuple(v.shape) for k, v in global_values.items() if v.is_floating_point()}
    public = {k: m for k, m in consensus.items() if k in floats}
    plan: SparseSumPlan | DPSumPlan
    if "dp-clip" in rec:  # distributed client-level DP: clip, noise, quantize here
        plan = _dp_plan(rec, st, context, floats, public)
        # OS entropy, never the run seed: the server knows the seed and could replay the noise
        x, _ = plan.encode(global_values, local, local_mask, np.random.default_rng())
    else:
        plan = SparseSumPlan(
            floats,
            public,
            full=bool(W.get_int(rec, "full")),
            clip=_get_float(rec, "clip"),
            quant_bits=W.get_int(rec, "quant-bits"),
            max_weight=W.get_int(rec, "max-weight"),
            num_clients=W.get_int(rec, "num-clients"),
        )
        x = plan.encode(global_values, local, local_mask, examples, loss)
    y = P.mask_input(st, x, P.ids_from_bytes(W.get_bytes(rec, "u1"), MAX_IDS))
    _save(context, st, c_pks)
    reply = _reply(msg, ConfigRecord({"masked": plan.layout().pack(y)}))
    if dp_record is not None:
        reply.content.metric_records["metrics"] = MetricRecord(dict(dp_record))
    return reply


def _get_float(rec: ConfigRecord, key: str) -> float:
    value = rec.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise SecAggError(f"secagg record entry {key!r} must be a finite number")
    return float(value)


def check_noise_floor(cfg: LeanfedConfig, node_config: dict[str, object]) -> None:
    """Refuse a run that adds less DP noise at this site than its own floor.

    A site sets ``--node-config dp-min-noise-multiplier=Z``; its ClientApp then answers a
    train or evaluate message only for a run whose noise it adds ITSELF with multiplier
    z >= Z: record-level DP-SGD (``privacy.mode="record"``) or distributed client-level
    noise under secure aggregation (``privacy.mode="client"`` + ``secure.mode="secagg"``).
    A run without DP, or with client-level noise that only the server adds (its update
    would leave the site in clear), is refused whatever its z. No floor: no check.
    """
    floor = node_config.get(MIN_NOISE_KEY)
    if floor is None:
        return
    if isinstance(floor, bool) or not isinstance(floor, int | float) or not (
        math.isfinite(floor) and floor >= 0
    ):
        raise SecAggError(f"node config {MIN_NOISE_KEY} must be a finite number >= 0")
    if floor == 0:
        return
    if cfg.privacy_mode == "none":
        raise SecAggError(
            f"the run adds no DP noise (privacy.mode none); this site's {MIN_NOISE_KEY} is "
            f"{floor:g}"
        )
    if cfg.privacy_mode == "client" and cfg.secure_mode != "secagg":
        raise SecAggError(
            "the run's client-level DP noise is added by the server (secure.mode "
            f"{cfg.secure_mode}), so this site's update would leave in clear; its "
            f"{MIN_NOISE_KEY} is {floor:g}"
        )
    if cfg.privacy_noise_multiplier < floor:
        raise SecAggError(
            f"the run's privacy.noise-multiplier {cfg.privacy_noise_multiplier:g} is below this "
            f"site's {MIN_NOISE_KEY} {floor:g}"
        )


def _dp_plan(
    rec: ConfigRecord,
    st: P.ClientState,
    context: Context,
    floats: dict[str, tuple[int, ...]],
    public: Mask,
) -> DPSumPlan:
    """The distributed-DP plan: the noise multiplier from the run config, never the plan.

    The round's plan supplies only public quantities (clip, sampled count, count noise);
    n_min comes from the run's threshold fraction and the key-sharer count, and a plan
    claiming another n_min (or fewer key sharers than this node's group has) is refused.
    The run config itself comes from whoever started the run (it is in the audit trail); a
    site that wants its own floor sets ``--node-config dp-min-noise-multiplier=Z`` and
    refuses any run configured with less noise.
    """
    cfg = LeanfedConfig.from_run_config(dict(context.run_config))
    if cfg.privacy_mode != "client":
        raise SecAggError("the server asked for DP noise; this site runs privacy.mode != client")
    check_noise_floor(cfg, dict(context.node_config))
    sharers, sampled = W.get_int(rec, "num-clients"), W.get_int(rec, "dp-sampled")
    if sharers < len(P.ids_from_bytes(W.get_bytes(rec, "u1"), MAX_IDS)) or sampled < sharers:
        raise SecAggError("the plan counts fewer key sharers than this node's group holds")
    n_min = min_survivors(sharers, cfg.secure_threshold)
    if W.get_int(rec, "dp-min-survivors") != n_min:
        raise SecAggError(f"the plan's n_min is not {n_min} (this site's secure.threshold)")
    clip, count_noise = _get_float(rec, "dp-clip"), _get_float(rec, "dp-count-noise")
    z = cfg.privacy_noise_multiplier
    if cfg.privacy_adaptive_clip:  # raises when the count noise would leave the values none
        z = adaptive_value_noise(z, count_noise)
    return DPSumPlan(
        floats,
        public,
        clip=clip,
        noise_std=client_noise_std(z, clip, n_min),
        count_noise_std=count_noise / math.sqrt(n_min) if cfg.privacy_adaptive_clip else 0.0,
        quant_bits=W.get_int(rec, "quant-bits"),
        num_clients=W.get_int(rec, "num-clients"),
        sampled=sampled,
    )


def unmask(msg: Message, context: Context) -> Message:
    """Stage 3: the shares the server needs (b of survivors, s_sk of dropped); then forget."""
    rec, server_round = _request(msg)
    st, _ = _load(context, server_round)
    survivors = P.ids_from_bytes(W.get_bytes(rec, "survivors"), MAX_IDS)
    dropped = P.ids_from_bytes(W.get_bytes(rec, "dropped"), MAX_IDS)
    del context.state.config_records[STATE]  # answer once: the secrets go now
    out = P.unmask_shares(st, survivors, dropped)
    reply = ConfigRecord(
        {"src": P.ids_to_bytes(s for s, _, _ in out), "kind": bytes(k for _, k, _ in out)}
    )
    if out:
        reply["shares"] = [share for _, _, share in out]
    return _reply(msg, reply)
