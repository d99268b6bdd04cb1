"""SuperNode authentication keys: one NIST P-384 key pair per site, OpenSSH format.

SuperNode authentication (``--enable-supernode-auth``) accepts only SuperNodes whose
public key the operator registered with ``flwr supernode register``; the private key
never leaves the site.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from server.security.errors import DeployError
from server.security.tls import write_secret

# Flower requires a NIST curve for SuperNode keys; P-384 is what its docs generate.
NODE_KEY_CURVE = ec.SECP384R1

@dataclass(frozen=True)
class NodeKeys:
    """One SuperNode's authentication key pair (OpenSSH format, NIST P-384)."""

    private_key: Path  # stays on the site: flower-supernode --auth-supernode-private-key
    public_key: Path  # goes to the operator: flwr supernode register PUBLIC_KEY


def generate_node_keys(out_dir: Path | str, nodes: int, *, prefix: str = "node") -> list[NodeKeys]:
    """Write ``{prefix}-{i}`` (private) and ``{prefix}-{i}.pub`` for i in 0..nodes-1."""
    if nodes < 1:
        raise DeployError(f"nodes must be >= 1, got {nodes}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pairs: list[NodeKeys] = []
    for i in range(nodes):
        key = ec.generate_private_key(NODE_KEY_CURVE())
        priv = out / f"{prefix}-{i}"
        pub = out / f"{prefix}-{i}.pub"
        write_secret(
            priv,
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.OpenSSH,
                serialization.NoEncryption(),
            ),
        )
        pub.write_bytes(
            key.public_key().public_bytes(
                serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
            )
            + f" {prefix}-{i}\n".encode()
        )
        pairs.append(NodeKeys(private_key=priv, public_key=pub))
    return pairs

