"""Per-process caches of what every call of a node's ClientApp rebuilds identically: the parsed
run config and the freshly initialised model, plus each client round's own RNG seed.

A simulation process (a pool worker, a Ray actor) runs thousands of node calls with the
same run config; parsing it (plug-in checks bind factory signatures) and building the
seeded model cost more than a small client's training. Both are pure functions of their
keys, and every call gets its own deep copy of the model, so caching cannot change a
result. Nothing here holds per-node data.
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
