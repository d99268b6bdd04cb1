"""Per-process caches of what every call of a node's ClientApp rebuilds identically: the parsed
run config and the freshly initialised model, plus each client round's own RNG seed.

A simulation process (a pool worker, a Ray actor) runs thousands of node calls with the
same run config; parsing it (plug-in checks bind factory signatures) and building the
seeded model cost more than a small client's training. Both are pure functions of their
keys, and every call gets the template's exact values (its own deep copy, or the process's
one working instance reset in place), so caching cannot change a result. Nothing here
holds per-node data.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from functools import lru_cache

import torch

from tasks.config import LeanfedConfig
from tasks.plugins import run_model

Shape = tuple[int, ...]
RunConfigItems = tuple[tuple[str, bool | float | int | str], ...]


@lru_cache(maxsize=8)
def _parsed(items: RunConfigItems) -> LeanfedConfig:
    return LeanfedConfig.from_run_config(dict(items))


def run_config(raw: Mapping[str, bool | float | int | str]) -> LeanfedConfig:
    """``LeanfedConfig.from_run_config``, parsed once per distinct run config per process."""
    return _parsed(tuple(raw.items()))


@lru_cache(maxsize=8)
def _template(cfg: LeanfedConfig, input_shape: Shape, num_classes: int) -> torch.nn.Module:
    return run_model(cfg, input_shape, num_classes)


def fresh_model(cfg: LeanfedConfig, input_shape: Shape, num_classes: int) -> torch.nn.Module:
    """The run's freshly initialised model: a deep copy of this process's seeded template.

    A copy carries the same parameter and buffer bytes as a new ``run_model`` call (the
    init is seeded by the run's seed alone), so nothing a node computes depends on it.
    """
    return copy.deepcopy(_template(cfg, tuple(input_shape), num_classes))


@lru_cache(maxsize=8)
def _instance(cfg: LeanfedConfig, input_shape: Shape, num_classes: int) -> torch.nn.Module:
    return copy.deepcopy(_template(cfg, input_shape, num_classes))


def work_model(cfg: LeanfedConfig, input_shape: Shape, num_classes: int) -> torch.nn.Module:
    """This process's one working copy of the template, reset to it in place.

    Same values as ``fresh_model`` (every parameter and buffer, persistent or not, is
    copied back from the template; gradients cleared; each module's train/eval mode and
    each parameter's ``requires_grad`` restored) without a deep copy per call, which costs
    more than the rest of receiving a small model. Valid until the next call with the same
    key: a node call must not keep the model beyond its own return.
    """
    shape = tuple(input_shape)
    template = _template(cfg, shape, num_classes)
    model = _instance(cfg, shape, num_classes)
    with torch.no_grad():
        for (_, w), (_, t) in zip(
            model.named_parameters(remove_duplicate=False),
            template.named_parameters(remove_duplicate=False),
            strict=True,
        ):
            w.copy_(t)
            w.grad = None
            w.requires_grad_(t.requires_grad)
        for (_, buf), (_, src) in zip(
            model.named_buffers(remove_duplicate=False),
            template.named_buffers(remove_duplicate=False),
            strict=True,
        ):
            buf.copy_(src)
    for mod, ref in zip(model.modules(), template.modules(), strict=True):
        mod.training = ref.training
    return model


def _plain(model: torch.nn.Module) -> bool:
    """No module customises loading or saving a state dict (hooks, overrides, extra state)."""
    base = torch.nn.Module
    return all(
        type(m)._load_from_state_dict is base._load_from_state_dict
        and type(m).get_extra_state is base.get_extra_state
        and not (
            m._load_state_dict_pre_hooks
            or m._load_state_dict_post_hooks
            or m._state_dict_hooks
            or m._state_dict_pre_hooks
        )
        for m in model.modules()
    )


def load_values(
    model: torch.nn.Module,
    values: Mapping[str, torch.Tensor],
    state: Mapping[str, torch.Tensor] | None = None,
) -> None:
    """``model.load_state_dict(values)`` (strict): for a plain model whose state dict has
    exactly ``values``' keys and shapes, the ``copy_`` per tensor that torch's loader
    does, without its per-module walk; anything else goes through ``load_state_dict``.
    ``state``: ``model.state_dict(keep_vars=True)`` if the caller has it."""
    sd = model.state_dict(keep_vars=True) if state is None else state
    if (
        sd.keys() != values.keys()
        or any(sd[k].shape != values[k].shape for k in sd)
        or not _plain(model)
    ):
        model.load_state_dict(values)
        return
    with torch.no_grad():
        for k, t in sd.items():
            t.copy_(values[k])


def client_round_seed(seed: int, server_round: int, node_id: int) -> int:
    """A 63-bit seed from (run seed, round, node id) alone, for the node's process RNG."""
    digest = hashlib.sha256(f"leanfed-client-rng/{seed}/{server_round}/{node_id}".encode())
    return int.from_bytes(digest.digest()[:8], "big") & ((1 << 63) - 1)


@contextmanager
def seeded_global_rng(seed: int) -> Iterator[None]:
    """Seed torch's global CPU RNG for the block (dropout draws from it), then restore it.

    A client round's dropout masks then depend on (seed, round, node) only, not on which
    process ran the node or what ran there before: the same with 0, 1 or N workers, on
    Ray, and after a resume.
    """
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        yield
