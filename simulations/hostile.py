"""Honest and hostile client replies, one maker per attack category, for the reply fuzzing.

A hostile maker starts from the honest reply a node would send and breaks one thing.
It returns ``[(message, honest), ...]``: a "duplicate" node sends its honest reply
first (which must be accepted) and then a second one (which must not). The tiny model
and the partition size are fixed so every bound is known; the categories cover every
rule of `strategies.aggregation.validate` and every codec failure class.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)

from simulations.fuzz_codec import CodecTarget, forged, mutated
from strategies import codec

SHAPES = {"fc1.weight": (16, 12), "fc1.bias": (16,), "fc2.weight": (4, 16), "fc2.bias": (4,)}
SPARSE = ("fc1.weight", "fc2.weight")
PARTITION = 500  # every node's partition size; the server knows it in the campaign
NOISE = 0.01  # std of an honest client's update per kept entry


def initial_state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(*s, generator=g) * 0.3 for k, s in SHAPES.items()}


@dataclass
class Ctx:
    """What a maker knows: the instruction, the honest reply's parts, the node's state."""

    kind: str  # "sparse" | "dense"
    instruction: Message
    values: dict[str, torch.Tensor]  # honest full-shape values (zeros off its mask)
    mask: dict[str, torch.Tensor]  # honest mask ({} for dense)
    received: dict[str, torch.Tensor]  # the global values this node was sent
    metrics: dict[str, int | float]
    rng: random.Random
    upload_dtype: str = "fp32"
    extra: dict[str, object] = field(default_factory=dict)

    def arrays(self, values: dict, mask: dict | None = None, send_mask: bool = True) -> ArrayRecord:
        if self.kind == "dense":
            return ArrayRecord({k: v.contiguous() for k, v in values.items()})
        m = self.mask if mask is None else mask
        return codec.to_arrayrecord(
            codec.encode(values, m, value_dtype=self.upload_dtype, send_mask=send_mask)
        )

    def reply(self, arrays: ArrayRecord | None = None, metrics: dict | None = None) -> Message:
        content = RecordDict(
            {
                "arrays": self.arrays(self.values) if arrays is None else arrays,
                "metrics": MetricRecord(self.metrics if metrics is None else metrics),  # type: ignore[arg-type]
            }
        )
        return Message(content, reply_to=self.instruction)


def honest_train(kind: str, instruction: Message, held: dict, rng: random.Random) -> Ctx:
    """Decode like the ClientApp, move each kept entry by N(0, NOISE), maybe regrow one."""
    arrays = instruction.content.array_records["arrays"]
    if kind == "dense":
        received = {k: v.clone() for k, v in arrays.to_torch_state_dict().items()}
        mask: dict[str, torch.Tensor] = {}
    else:
        received, mask = codec.decode_with(codec.from_arrayrecord(arrays), held.get("mask"))
        held["mask"] = mask
        mask = {k: m.clone() for k, m in mask.items()}
    regrew = kind == "sparse" and rng.random() < 0.3
    if regrew:  # move one active entry of a layer elsewhere (same count, as DST does)
        flat = mask[rng.choice(SPARSE)].view(-1)
        on, off = flat.nonzero().flatten(), (~flat).nonzero().flatten()
        if len(on) and len(off):
            flat[on[rng.randrange(len(on))]] = False
            flat[off[rng.randrange(len(off))]] = True
    g = torch.Generator().manual_seed(rng.getrandbits(31))
    values = {k: v + NOISE * torch.randn(v.shape, generator=g) for k, v in received.items()}
    values = {k: v * mask[k] if k in mask else v for k, v in values.items()}
    metrics: dict[str, int | float] = {
        "num-examples": rng.randrange(1, PARTITION + 1),
        "train_loss": rng.uniform(0.0, 3.0),
        "density": 0.5,
        "upload_bytes": rng.randrange(10**6),
        "regrew": int(regrew),
        "drift": rng.randrange(2),
    }
    if rng.random() < 0.2:
        metrics["my_own_metric"] = rng.random()  # unknown keys are dropped, not punished
    ctx = Ctx(kind, instruction, values, mask, received, metrics, rng)
    ctx.extra["send_mask"] = regrew
    return ctx


def honest_train_reply(ctx: Ctx) -> Message:
    send = bool(ctx.extra.get("send_mask", True))
    return ctx.reply(ctx.arrays(ctx.values, send_mask=send) if ctx.kind == "sparse" else None)


def honest_evaluate_reply(instruction: Message, rng: random.Random) -> Message:
    metrics: dict[str, int | float] = {
        "num-examples": rng.randrange(1, PARTITION + 1),
        "eval_loss": rng.uniform(0, 3),
        "eval_acc": rng.random(),
        "task_acc.0": rng.random(),
    }
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=instruction)  # type: ignore[arg-type]


def forged_instruction(node: int, kind: str) -> Message:
    """An instruction to a node the server never picked (for a reply it never asked for)."""
    return Message(
        RecordDict(), node, MessageType.TRAIN if kind == "train" else MessageType.EVALUATE
    )


# --------------------------------------------------------------------------- makers
Made = list[tuple[Message, bool]]


def _one(msg: Message) -> Made:
    return [(msg, False)]


def _error(ctx: Ctx) -> Made:
    text = "".join(chr(ctx.rng.randrange(1, 0x2FF)) for _ in range(ctx.rng.randrange(0, 400)))
    return _one(
        Message(Error(code=ctx.rng.randrange(0, 10**6), reason=text), reply_to=ctx.instruction)
    )


def _bad_metrics(ctx: Ctx, phase: str) -> dict[str, object]:
    m: dict[str, object] = dict(ctx.metrics)
    rng = ctx.rng
    choice = rng.randrange(6)
    if choice == 0:
        del m["num-examples"]
    elif choice == 1:
        m["num-examples"] = rng.choice([0, -5, 2.5, float("nan"), 10**7, PARTITION + 1])
    elif choice == 2:  # a known key out of its bounds or not finite
        key = "train_loss" if phase == "train" else "eval_loss"
        m[key] = rng.choice([float("nan"), float("inf"), -1.0, 1e12])
    elif choice == 3:
        key, bad = rng.choice(
            [("density", 1.5), ("drift", 2), ("regrew", -1), ("upload_bytes", -3)]
            if phase == "train"
            else [("eval_acc", 1.5), ("task_acc.3", -0.1), ("eval_acc", float("nan"))]
        )
        m[key] = bad
    elif choice == 4:
        m["train_loss" if phase == "train" else "eval_acc"] = [0.1, 0.2]  # a list, not a scalar
    else:
        m.update({f"junk{i}": float(i) for i in range(300)})
    return m


def _metrics(ctx: Ctx) -> Made:
    return _one(ctx.reply(metrics=_bad_metrics(ctx, "train")))


def _records(ctx: Ctx) -> Made:
    content = ctx.reply().content
    choice = ctx.rng.randrange(4)
    if choice == 0:
        del content.metric_records["metrics"]
    elif choice == 1:
        content.metric_records["more"] = MetricRecord({"num-examples": 3})
    elif choice == 2:
        content.config_records["cfg"] = ConfigRecord({"x": 1})
    else:
        content.array_records["extra"] = ArrayRecord({"w": Array(np.zeros(2, np.float32))})
    return _one(Message(content, reply_to=ctx.instruction))


def _duplicate(ctx: Ctx) -> Made:
    honest = honest_train_reply(ctx) if "send_mask" in ctx.extra else ctx.reply()
    shifted = {k: v + 0.5 * ctx.mask.get(k, 1) for k, v in ctx.values.items()}
    return [(honest, True), (ctx.reply(ctx.arrays(shifted)), False)]


def _unsampled(ctx: Ctx) -> Made:
    ghost = forged_instruction(ctx.rng.getrandbits(63) | 1, "train")
    msg = ctx.reply()
    return _one(Message(msg.content, reply_to=ghost))


def _tensor(ctx: Ctx) -> str:
    return ctx.rng.choice(list(ctx.values))


def _shape(ctx: Ctx) -> Made:
    vals, mask = dict(ctx.values), dict(ctx.mask)
    key = _tensor(ctx)
    vals[key] = torch.zeros(vals[key].numel() + 1)
    mask.pop(key, None)
    if ctx.rng.random() < 0.5:
        del vals[key]
    else:
        vals["extra.weight"] = torch.zeros(3)
    return _one(ctx.reply(ctx.arrays(vals, mask)))


def _dtype(ctx: Ctx) -> Made:
    vals = dict(ctx.values)
    key = _tensor(ctx)
    vals[key] = vals[key].to(ctx.rng.choice([torch.float64, torch.float16, torch.int64]))
    return _one(ctx.reply(ctx.arrays(vals)))


def _poke(ctx: Ctx, value: float) -> dict[str, torch.Tensor]:
    vals = {k: v.clone() for k, v in ctx.values.items()}
    key = _tensor(ctx)
    flat = vals[key].view(-1)
    keep = (
        ctx.mask[key].view(-1).nonzero().flatten()
        if key in ctx.mask
        else torch.arange(flat.numel())
    )
    flat[keep[ctx.rng.randrange(len(keep))]] = value
    return vals


def _nonfinite(ctx: Ctx) -> Made:
    return _one(
        ctx.reply(
            ctx.arrays(_poke(ctx, ctx.rng.choice([float("nan"), float("inf"), -float("inf")])))
        )
    )


def _huge(ctx: Ctx) -> Made:
    return _one(ctx.reply(ctx.arrays(_poke(ctx, ctx.rng.choice([1e7, -3e8, 1e30])))))


def _norm(ctx: Ctx) -> Made:
    scale = ctx.rng.choice([300.0, -300.0, 1000.0])
    vals = {k: ctx.received[k] + scale * (v - ctx.received[k]) for k, v in ctx.values.items()}
    vals = {k: v * ctx.mask[k] if k in ctx.mask else v for k, v in vals.items()}
    return _one(ctx.reply(ctx.arrays(vals)))


def _dense_layer(ctx: Ctx) -> Made:
    """fc2 fully on while fc1 gives up as many entries: overall density unchanged."""
    mask = {k: m.clone() for k, m in ctx.mask.items()}
    added = int((~mask["fc2.weight"]).sum())
    mask["fc2.weight"][:] = True
    on = mask["fc1.weight"].view(-1).nonzero().flatten()
    mask["fc1.weight"].view(-1)[on[:added]] = False
    if ctx.rng.random() < 0.5:  # or every layer fully on
        mask = {k: torch.ones_like(m) for k, m in mask.items()}
    vals = {
        k: (ctx.received[k] + 0.01) * mask[k] if k in mask else v for k, v in ctx.values.items()
    }
    return _one(ctx.reply(ctx.arrays(vals, mask)))


def _payload(ctx: Ctx) -> Made:
    if ctx.kind == "dense":
        return _one(ctx.reply(_forged_dense(ctx)))
    honest = codec.encode(ctx.values, ctx.mask, value_dtype=ctx.upload_dtype)
    spec = codec.expected_spec(ctx.values, ctx.mask)
    target = CodecTarget(ctx.values, ctx.mask, spec, [honest])
    choice = ctx.rng.randrange(3)
    if choice == 0:
        data = ctx.rng.randbytes(ctx.rng.choice([0, 5, 18, 200]))
    elif choice == 1:
        data = mutated(target, ctx.rng)
        try:  # a re-sealed mutation of a value byte is just another valid update
            codec.decode_with(data, ctx.mask, spec)
            data = honest[:-1]
        except codec.CodecError:
            pass
    else:
        data = forged(target, ctx.rng)
    return _one(ctx.reply(codec.to_arrayrecord(data)))


def _forged_dense(ctx: Ctx) -> ArrayRecord:
    """A Flower ArrayRecord whose Array lies about its dtype, shape or bytes."""
    rec = ctx.arrays(ctx.values)
    key = _tensor(ctx)
    a = rec[key]
    choice = ctx.rng.randrange(3)
    if choice == 0:
        rec[key] = Array(dtype="float32", shape=(10**6, 10**6), stype="numpy.ndarray", data=a.data)
    elif choice == 1:
        rec[key] = Array(dtype=a.dtype, shape=a.shape, stype=a.stype, data=ctx.rng.randbytes(64))
    else:
        rec[key] = Array(dtype="object", shape=a.shape, stype=a.stype, data=a.data)
    return rec


TRAIN_MAKERS: dict[str, Callable[[Ctx], Made]] = {
    "error": _error,
    "duplicate": _duplicate,
    "unsampled": _unsampled,
    "records": _records,
    "metrics": _metrics,
    "payload": _payload,
    "shape_or_keys": _shape,
    "dtype": _dtype,
    "nonfinite": _nonfinite,
    "huge_values": _huge,
    "norm": _norm,
    "density": _dense_layer,  # sparse only
}
SPARSE_ONLY = frozenset({"density"})


def hostile_evaluate(category: str, instruction: Message, rng: random.Random) -> Made:
    """Evaluate-reply attacks: error, duplicate, unsampled, records, metrics."""
    honest = honest_evaluate_reply(instruction, rng)
    metrics = dict(honest.content.metric_records["metrics"])
    ctx = Ctx("dense", instruction, {}, {}, {}, metrics, rng)  # type: ignore[arg-type]
    if category == "error":
        return _error(ctx)
    if category == "duplicate":
        return [(honest, True), (honest_evaluate_reply(instruction, rng), False)]
    if category == "unsampled":
        ghost = forged_instruction(rng.getrandbits(63) | 1, "evaluate")
        return _one(Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=ghost))
    if category == "records":
        content = RecordDict({"metrics": MetricRecord(metrics), "arrays": ArrayRecord()})
        return _one(Message(content, reply_to=instruction))
    bad = _bad_metrics(ctx, "evaluate")
    return _one(Message(RecordDict({"metrics": MetricRecord(bad)}), reply_to=instruction))  # type: ignore[arg-type]


EVALUATE_CATEGORIES = ("error", "duplicate", "unsampled", "records", "metrics")
