"""Signed checkpoints: what a signature covers, signing at record time, checking on read.

A checkpoint signature covers (run id, round, SHA-256 and size of the checkpoint bytes,
SHA-256 of the run's stored config, SHA-256 of the round's site list [node id, accepted,
reason]). Changing the model, the config a resume would rebuild the strategy from, or who
took part in a round breaks it; recomputing the store's checksum does not help.

Policy (deploy/README.md, "Signed checkpoints"):
- no key configured: checkpoints are stored unsigned and `runs show` says UNSIGNED;
  resuming a signed run is refused (it cannot be verified), and so is resuming an
  unsigned run in a store that holds any signed checkpoint (signatures may have been
  stripped);
- a key configured: every checkpoint of the run must carry a valid signature by that
  key; resuming an unsigned run is refused (signing now would vouch for unverified state).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from server.security.errors import SignatureError
from server.security.signing import Signer, Verifier, digest
from server.store import RunStore

DOMAIN = "leanfed-checkpoint/1"


def sites_of(clients: Iterable[Mapping[str, Any]]) -> list[list[Any]]:
    """[node id, accepted, reason] of each reply in a round, sorted (order-free digest)."""
    rows = [
        [str(c["node_id"]), bool(c["accepted"]), _reason(c.get("reason"))]
        for c in clients
    ]
    return sorted(rows, key=lambda r: (r[0], r[1], r[2] or ""))


def _reason(value: Any) -> str | None:
    return None if value is None else str(value)


def round_payload(
    run_id: str, round: int, sha256: str, size: int, config_sha256: str, sites: list[list[Any]]
) -> dict[str, Any]:
    """The JSON object a checkpoint signature covers."""
    return {
        "run_id": run_id,
        "round": round,
        "checkpoint_sha256": sha256,
        "checkpoint_size": size,
        "config_sha256": config_sha256,
        "sites_sha256": digest(sites),
    }


def sign_round(
    signer: Signer,
    run_id: str,
    round: int,
    sha256: str,
    size: int,
    config: Mapping[str, Any],
    clients: Iterable[Mapping[str, Any]],
) -> tuple[bytes, str]:
    """(signature, key id) for one round's checkpoint, as ``record_round`` stores it."""
    payload = round_payload(run_id, round, sha256, size, digest(dict(config)), sites_of(clients))
    return signer.sign(DOMAIN, payload), signer.key_id


def verify_run(store: RunStore, run_id: str, verifier: Verifier) -> int:
    """Check the signature of every checkpoint of the run; return how many there are.

    Only recorded hashes are read: the store checks a blob against its hash when loading it.
    """
    sigs = store.checkpoint_signatures(run_id)
    config_sha = digest(dict(store.get_run(run_id).config))
    for c in sigs:
        what = f"run {run_id} round {c.round} checkpoint"
        if c.signature is None:
            raise SignatureError(f"{what} is unsigned; refusing it with a signing key configured")
        if c.key_id != verifier.key_id:
            raise SignatureError(
                f"{what} is signed by key {c.key_id}, not the configured key {verifier.key_id}"
            )
        clients = store.get_client_results(run_id, c.round)
        sites = sites_of(
            {"node_id": r.node_id, "accepted": r.accepted, "reason": r.reason} for r in clients
        )
        payload = round_payload(run_id, c.round, c.sha256, c.size, config_sha, sites)
        verifier.verify(DOMAIN, payload, c.signature, what)
    return len(sigs)


def run_is_signed(store: RunStore, run_id: str) -> bool:
    """Whether the run has a signing key or any signed checkpoint."""
    if store.get_run(run_id).signing_key_id is not None:
        return True
    return any(c.signature is not None for c in store.checkpoint_signatures(run_id))


def check_resume(
    store: RunStore, run_id: str, verifier: Verifier | None, action: str = "resuming"
) -> None:
    """Apply the policy above before anything of a stored run is deserialized.

    ``action`` names what is refused in the message ("resuming", "exporting").
    """
    signed = run_is_signed(store, run_id)
    if verifier is None:
        if signed:
            key = store.get_run(run_id).signing_key_id or "a key"
            raise SignatureError(
                f"run {run_id} is signed by {key}; pass --signing-key or set "
                f"LEANFED_SIGNING_KEY to verify it before {action}"
            )
        if store.has_signed_checkpoints():
            raise SignatureError(
                f"run {run_id} is unsigned but this store holds signed runs (signatures may "
                f"have been stripped); refusing {action} it without checking it"
            )
        return
    if not signed:
        raise SignatureError(
            f"run {run_id} was recorded unsigned; a signing key would vouch for state nobody "
            f"signed; refusing {action} it with a key (leave --signing-key and "
            "LEANFED_SIGNING_KEY unset)"
        )
    verify_run(store, run_id, verifier)


def signature_status(store: RunStore, run_id: str, verifier: Verifier | None) -> str:
    """One line for `runs show`; raises SignatureError when a signature is bad."""
    signed = run_is_signed(store, run_id)
    if not signed:
        return "UNSIGNED (no signing key was configured when it was recorded)"
    key = store.get_run(run_id).signing_key_id or "unknown key"
    if verifier is None:
        return f"signed by {key}, NOT VERIFIED (pass --signing-key or set LEANFED_SIGNING_KEY)"
    n = verify_run(store, run_id, verifier)
    return f"valid: {n} checkpoints signed by {verifier.key_id}"
