"""Byzantine clients for the robustness benchmark: a ClientApp that wraps the real leanfed one.

The production ClientApp (`client.app`) is never changed: `attack_app(attack, attackers)`
builds a ClientApp that runs it on every node, then rewrites the train reply of the nodes
of partitions 0..attackers-1 (the benchmark harness passes this app to an `InProcessGrid`).
The rewritten reply is a well-formed codec payload, so it goes through the real
SparseFedAvg validation and merge exactly as a malicious site's would.

Attacks (g = the global model received this round, v = the honest trained values, m = the
client's mask; only floating-point kept coordinates change, integer buffers never):
- "shift": a large constant shift, v' = g + 10 on every kept coordinate.
- "sign-flip": the update reversed and scaled, v' = g - 10 (v - g) (Blanchard et al. 2017).
- "inflate": inflated example count, num-examples x 1000 with the update reversed at unit
  scale, v' = g - (v - g): a weighted rule then follows the attacker.
- "random-mask": a fresh uniformly random mask per sparse layer with the client's own
  count of kept entries, values N(0, (10 s_l)^2) (s_l = std of the honest kept values of
  that layer), mask always sent: it targets the consensus vote and coordinates nobody keeps.
"""

from __future__ import annotations

from typing import cast

import torch
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.app import _load_mask
from client.app import evaluate as honest_evaluate
from client.app import train as honest_train
from strategies import codec
from strategies.sparse.masks import Mask

ATTACKS = ("shift", "sign-flip", "inflate", "random-mask")
SCALE = 10.0  # shift size and sign-flip / noise scale
INFLATE = 1000  # num-examples multiplier of "inflate"


def _kept(mask: Mask, key: str, like: torch.Tensor) -> torch.Tensor:
    return mask[key] if key in mask else torch.ones_like(like, dtype=torch.bool)


def attack_update(
    attack: str,
    global_values: dict[str, torch.Tensor],
    values: dict[str, torch.Tensor],
    mask: Mask,
    generator: torch.Generator,
) -> tuple[dict[str, torch.Tensor], Mask]:
    """The attacker's (values, mask) from the honest ones; see the module docstring."""
    if attack not in ATTACKS:
        raise ValueError(f"unknown attack {attack!r}; known: {ATTACKS}")
    out, out_mask = dict(values), dict(mask)
    for key, v in values.items():
        if not v.is_floating_point():
            continue
        g, keep = global_values[key].to(v.dtype), _kept(mask, key, v)
        if attack == "shift":
            new = g + SCALE
        elif attack == "sign-flip":
            new = g - SCALE * (v - g)
        elif attack == "inflate":
            new = g - (v - g)
        else:  # random-mask
            if key not in mask:
                continue  # dense tensors (biases) keep the honest values
            std = float(v[keep].std()) if int(keep.sum()) > 1 else 1.0
            flat = torch.zeros(v.numel(), dtype=torch.bool)
            flat[torch.randperm(v.numel(), generator=generator)[: int(keep.sum())]] = True
            keep = flat.reshape(v.shape)
            out_mask[key] = keep
            new = torch.randn(v.shape, generator=generator) * SCALE * max(std, 1e-3)
        out[key] = torch.where(keep, new, torch.zeros_like(v))
    return out, out_mask


def hostile_reply(attack: str, msg: Message, reply: Message, context: Context) -> Message:
    """The honest `reply` to the train message `msg`, rewritten by `attack`."""
    # After the honest round, the node's state holds this round's global mask.
    global_mask = _load_mask(context)
    received = codec.from_arrayrecord(msg.content.array_records["arrays"])
    global_values, global_mask = codec.decode_with(received, global_mask)
    sent = codec.from_arrayrecord(reply.content.array_records["arrays"])
    values, mask = codec.decode_with(sent, global_mask)
    config = msg.content.config_records["config"]
    server_round = int(cast(int, config["server-round"]))
    gen = torch.Generator().manual_seed(context.node_id % (2**62) + server_round)
    bad_values, bad_mask = attack_update(attack, global_values, values, mask, gen)
    upload = str(config.get("leanfed.upload-dtype", "fp32"))
    payload = codec.encode(bad_values, bad_mask, value_dtype=upload, send_mask=True)
    metrics = MetricRecord(dict(reply.content.metric_records["metrics"]))
    if attack == "inflate":
        metrics["num-examples"] = int(cast(int, metrics["num-examples"])) * INFLATE
    metrics["upload_bytes"] = len(payload)
    content = RecordDict({"arrays": codec.to_arrayrecord(payload), "metrics": metrics})
    return Message(content, reply_to=msg)


def attack_app(attack: str, attackers: int) -> ClientApp:
    """The real ClientApp on every node; nodes of partitions < `attackers` run `attack`."""
    if attack not in ATTACKS and attackers > 0:
        raise ValueError(f"unknown attack {attack!r}; known: {ATTACKS}")
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        reply = honest_train(msg, context)
        if reply.has_error() or int(cast(int, context.node_config["partition-id"])) >= attackers:
            return reply
        return hostile_reply(attack, msg, reply, context)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        # Attackers evaluate honestly (the benchmark measures the global model centrally).
        return honest_evaluate(msg, context)

    return app
