"""The leanfed Flower ClientApp: decode the global sparse model, train with DST, reply sparsely."""

from __future__ import annotations

import time
from functools import lru_cache

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client import received, secagg
from client.condensed import CONDENSED_KEY, node_capacity, receive_condensed
from client.continual import client_stream, continual_round, current_experience, node_seed
from client.data import local_data
from client.dp_local import account_site
from client.local import RoundOutcome, local_evaluate, local_round
from client.statics import (
    client_round_seed,
    fresh_model,
    load_values,
    run_config,
    seeded_global_rng,
    work_model,
)
from strategies import codec
from strategies.aggregation import secagg_wire
from strategies.aggregation.metric_rules import DP_ROUNDS_KEY, EPSILON_KEY, WEIGHT_KEY
from strategies.sparse.masks import Mask, unpack_mask
from tasks.config import LeanfedConfig

app = ClientApp()
# SecAgg+ key stages (query.secagg_*); the masked input itself is the train reply.
app.query(secagg_wire.ADVERTISE)(secagg.advertise)
app.query(secagg_wire.SHARE)(secagg.share)
app.query(secagg_wire.UNMASK)(secagg.unmask)

STATE_KEY = "leanfed"  # ConfigRecord in context.state: the last global mask this node holds


def _config(context: Context) -> LeanfedConfig:
    return run_config(context.run_config)


def _load_mask(context: Context) -> Mask | None:
    rec = context.state.config_records.get(STATE_KEY)
    if rec is None or "names" not in rec:
        return None
    names = list(rec["names"])  # type: ignore[arg-type]
    mask: Mask = {}
    for name in names:
        shape = tuple(int(s) for s in rec[f"shape:{name}"])  # type: ignore[union-attr]
        mask[str(name)] = unpack_mask(bytes(rec[f"bits:{name}"]), shape)  # type: ignore[arg-type]
    return mask


def _held(context: Context) -> received.Held | None:
    """The mask this node holds, as stored (a key for the broadcast cache), or None."""
    rec = context.state.config_records.get(STATE_KEY)
    if rec is None or "names" not in rec:
        return None
    return tuple(
        (
            str(name),
            tuple(int(s) for s in rec[f"shape:{name}"]),  # type: ignore[union-attr]
            bytes(rec[f"bits:{name}"]),  # type: ignore[arg-type]
        )
        for name in list(rec["names"])  # type: ignore[arg-type]
    )


@lru_cache(maxsize=4)
def _packed_record(packed: received.Held) -> ConfigRecord:
    # Packed bits: ~numel/8 bytes, small enough to ride along with context.state.
    rec = ConfigRecord({"names": [name for name, _, _ in packed]})
    for name, shape, bits in packed:
        rec[f"shape:{name}"] = list(shape)
        rec[f"bits:{name}"] = bits
    return rec


def _save_packed(context: Context, packed: received.Held) -> None:
    # Every node of a round stores the same mask: Flower validates each item a record is
    # built with (14 us here), so the record is built once per mask per process and each
    # node gets its own copy (ConfigRecord.copy: same items, no validation; the lists in
    # it are shared and nothing changes them in place).
    context.state.config_records[STATE_KEY] = _packed_record(packed).copy()


def _receive(msg: Message, context: Context, model: torch.nn.Module) -> Mask | None:
    """Load the global model into ``model``; return the global mask (None when dense)."""
    arrays = msg.content.array_records["arrays"]
    if codec.PAYLOAD_KEY not in arrays:  # Flower's dense FedAvg baseline
        model.load_state_dict(arrays.to_torch_state_dict())
        return None
    # The server's payload must hold exactly this model's tensors (checked before allocating).
    state = model.state_dict(keep_vars=True)
    expected = codec.expected_spec(state, None)
    # Every node of a round gets the same bytes: decode them once per process.
    held = _held(context)
    values, mask, packed = received.decode_broadcast(
        arrays, held, lambda: _load_mask(context), expected
    )
    if packed != held:  # an unchanged mask leaves the stored record (and its bytes) as is
        _save_packed(context, packed)
    load_values(model, values, state)
    return mask


def _model_and_data(
    context: Context, reuse: bool = True, cfg: LeanfedConfig | None = None
) -> tuple[LeanfedConfig, torch.nn.Module, torch.Tensor, torch.Tensor]:
    """Config, model and data. ``reuse``: this process's working instance (no deep copy);
    False for a caller that changes the model's structure (a condensed sub-network).
    ``cfg``: the context's config if the caller has it."""
    cfg = _config(context) if cfg is None else cfg
    data = local_data(cfg, dict(context.node_config))
    make = work_model if reuse else fresh_model
    model = make(cfg, data.input_shape, data.num_classes)
    return cfg, model, data.x, data.y


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train locally under the global mask and reply with values under the client's own mask."""
    cfg = _config(context)
    secagg.check_noise_floor(cfg, dict(context.node_config))  # before anything is computed
    config = msg.content.config_records["config"]  # a view rebuilt per access: read once
    server_round = int(config["server-round"])  # type: ignore[arg-type]
    # Dropout draws from the global RNG: seed it per (run, round, node) for this round.
    with seeded_global_rng(client_round_seed(cfg.seed, server_round, context.node_id)):
        model, out, on_wire = _train_round(msg, context, cfg, config, server_round)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    if config.get(secagg_wire.MODE_KEY) == "secagg":
        if out.mask is None:
            raise ValueError("secure aggregation needs the sparse strategy's masked messages")
        # The global this round started from, decoded again: the update is local - global.
        received = codec.decode_with(
            codec.from_arrayrecord(msg.content.array_records["arrays"]), _load_mask(context)
        )
        clear = None  # record-level DP: this site's accounting record, in clear
        if EPSILON_KEY in out.extra:
            clear = {
                EPSILON_KEY: float(out.extra[EPSILON_KEY]),
                DP_ROUNDS_KEY: int(out.extra[DP_ROUNDS_KEY]),
                WEIGHT_KEY: int(out.num_examples),
            }
        return secagg.masked_reply(
            msg, context, received, state, out.mask, out.num_examples, float(out.loss), clear
        )
    if out.mask is None:
        arrays = ArrayRecord(state)
        upload = sum(len(a.data) for a in arrays.values())
    elif on_wire is not None:  # condensed: the mask it was sent, so no mask bits go back
        wire_mask = {k: out.mask[k] for k in on_wire}
        payload = codec.encode(
            state, wire_mask, value_dtype=cfg.codec_upload_dtype, send_mask=False
        )
        arrays, upload = codec.to_arrayrecord(payload), len(payload)
    else:
        # The mask rides along only when this client changed it.
        payload = codec.encode(
            state, out.mask, value_dtype=cfg.codec_upload_dtype, send_mask=out.regrew
        )
        arrays, upload = codec.to_arrayrecord(payload), len(payload)
    density = 1.0 if out.mask is None else _density(out.mask)
    metrics = MetricRecord(
        {
            "num-examples": out.num_examples,
            "train_loss": float(out.loss),
            "density": density,
            "upload_bytes": int(upload),
            "regrew": int(out.regrew),
            "dropped": out.dropped,
            "grown": out.grown,
            "drift": 0,
        }
    )
    for key, value in out.extra.items():  # continual clients: drift, task_switch, task_id, ...
        metrics[key] = value
    return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)


def _train_round(
    msg: Message, context: Context, cfg: LeanfedConfig, config: ConfigRecord, server_round: int
) -> tuple[torch.nn.Module, RoundOutcome, list[str] | None]:
    """Receive the global model and train this round (continual clients: on their stream).

    ``config``: the message's "config" record, read once by the caller. Returns the
    model, the outcome (``extra`` holds "capacity" and "train_s", the seconds
    of local training) and, for a condensed sub-network, the keys whose mask the reply
    carries (None otherwise).
    """
    capacity = node_capacity(dict(context.node_config))
    condensed = config.get(CONDENSED_KEY) == 1
    on_wire: list[str] | None = None
    if cfg.cl_scenario != "none":
        started = time.perf_counter()
        model, out = _continual_train(msg, context, cfg, server_round)
    else:
        # A condensed node shrinks its model in place: that one needs its own copy.
        cfg, model, x, y = _model_and_data(context, reuse=not condensed, cfg=cfg)
        mask: Mask | None
        if condensed:  # the server sent this node's sub-network: train it physically smaller
            model, mask, on_wire = receive_condensed(msg.content, cfg, model)
        else:
            mask = _receive(msg, context, model)
        # Real Flower node ids are random 64-bit numbers: fold the seed into int64 range.
        seed = (cfg.seed * 1_000_003 + context.node_id * 7919 + server_round) % (2**63)
        gen = torch.Generator().manual_seed(seed)
        mu = float(config.get("proximal-mu", 0.0))  # type: ignore[arg-type]
        started = time.perf_counter()  # local training only (not data loading or decoding)
        out = local_round(model, x, y, cfg, server_round, mask, gen, mu, condensed=condensed)
        if cfg.privacy_mode == "record":  # this site's epsilon over all its DP-SGD steps
            eps, rounds = account_site(context.state, cfg, out.steps, len(x))
            out.extra[EPSILON_KEY], out.extra[DP_ROUNDS_KEY] = eps, rounds
    out.extra["train_s"] = time.perf_counter() - started
    out.extra["capacity"] = capacity
    return model, out, on_wire


def _continual_train(
    msg: Message, context: Context, cfg: LeanfedConfig, server_round: int
) -> tuple[torch.nn.Module, RoundOutcome]:
    """The client's data is its stream: restore CL state, advance, regrow/protect, train."""
    data = client_stream(cfg, dict(context.node_config))
    model = fresh_model(cfg, data.input_shape, data.num_classes)
    mask = _receive(msg, context, model)
    seed = node_seed(cfg, context.node_id)
    gen = torch.Generator().manual_seed((seed + server_round) % (2**63))
    out = continual_round(model, cfg, server_round, mask, data, context.state, gen, seed)
    return model, out


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the received global model on this node's local data (its current experience)."""
    cfg = _config(context)
    secagg.check_noise_floor(cfg, dict(context.node_config))  # a refused run gets nothing
    per_task: dict[str, float] = {}
    if cfg.cl_scenario != "none":
        data = client_stream(cfg, dict(context.node_config))
        model = fresh_model(cfg, data.input_shape, data.num_classes)
        _receive(msg, context, model)
        # This client's row of the accuracy matrix: the global model on its own data of
        # every experience in its stream (future ones too, for forward transfer).
        for j in range(len(data.stream)):
            e = data.stream.experience(j)
            per_task[f"task_acc.{j}"] = local_evaluate(model, e.x, e.y)[1]
        exp = current_experience(data, context.state)
        x, y = exp.x, exp.y
    else:
        _, model, x, y = _model_and_data(context)
        _receive(msg, context, model)
    loss, acc = local_evaluate(model, x, y)
    metrics = MetricRecord({"num-examples": len(x), "eval_loss": loss, "eval_acc": acc, **per_task})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)


def _density(mask: Mask) -> float:
    total = sum(m.numel() for m in mask.values())
    return float(sum(int(m.sum()) for m in mask.values()) / max(1, total))
