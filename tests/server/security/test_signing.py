"""Ed25519 signing keys: generation, loading rules, domain-separated signatures, the CLI."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from server.security.errors import DeployError, SignatureError
from server.security.node_keys import generate_node_keys
from server.security.signing import (
    ENV_VAR,
    canonical_json,
    generate_signing_key,
    load_signer,
    load_verifier,
    signer_from,
    verifier_from,
)
from simulations.cli import app


def test_generated_key_files_modes_and_formats(tmp_path: Path) -> None:
    files = generate_signing_key(tmp_path, "srv")
    assert stat.S_IMODE(files.private_key.stat().st_mode) == 0o600
    assert stat.S_IMODE(files.public_key.stat().st_mode) == 0o644
    assert files.private_key.read_bytes().startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----")
    line = files.public_key.read_text()
    assert line.startswith("ssh-ed25519 ") and line.rstrip().endswith(" srv")
    # The .pub is what Flower's --trusted-entities loads.
    pub = serialization.load_ssh_public_key(line.split(" srv")[0].encode())
    assert isinstance(pub, ed25519.Ed25519PublicKey)
    signer, verifier = load_signer(files.private_key), load_verifier(files.public_key)
    assert signer.key_id == verifier.key_id == files.key_id
    assert files.key_id.startswith("ed25519:") and len(files.key_id) == 8 + 32
    with pytest.raises(DeployError, match="refusing to overwrite"):
        generate_signing_key(tmp_path, "srv")


def test_sign_verify_and_domain_separation(tmp_path: Path) -> None:
    signer = load_signer(generate_signing_key(tmp_path).private_key)
    sig = signer.sign("leanfed-checkpoint/1", {"round": 1, "sha": "ab"})
    signer.verifier.verify("leanfed-checkpoint/1", {"sha": "ab", "round": 1}, sig, "x")
    with pytest.raises(SignatureError, match="^x: signature does not match"):
        signer.verifier.verify("leanfed-export/1", {"round": 1, "sha": "ab"}, sig, "x")
    with pytest.raises(SignatureError, match="signature does not match"):
        signer.verifier.verify("leanfed-checkpoint/1", {"round": 2, "sha": "ab"}, sig, "x")
    with pytest.raises(SignatureError, match="63 bytes"):
        signer.verifier.verify("leanfed-checkpoint/1", {"round": 1, "sha": "ab"}, sig[:63], "x")
    other = load_signer(generate_signing_key(tmp_path, "other").private_key)
    with pytest.raises(SignatureError, match="another key"):
        other.verifier.verify("leanfed-checkpoint/1", {"round": 1, "sha": "ab"}, sig, "x")


@settings(max_examples=30, deadline=None)
@given(st.dictionaries(st.text(max_size=5), st.integers() | st.text(max_size=5), max_size=5))
def test_canonical_json_ignores_key_order(d: dict[str, object]) -> None:
    assert canonical_json(d) == canonical_json(dict(reversed(list(d.items()))))


def test_key_loading_refusals(tmp_path: Path) -> None:
    files = generate_signing_key(tmp_path)
    with pytest.raises(SignatureError, match="is a public key"):
        load_signer(files.public_key)
    os.chmod(files.private_key, 0o644)
    with pytest.raises(SignatureError, match="chmod 600"):
        load_signer(files.private_key)
    with pytest.raises(SignatureError, match="does not exist"):
        load_signer(tmp_path / "missing")
    (big := tmp_path / "big").write_bytes(b"x" * 20_000)
    with pytest.raises(SignatureError, match="not a key file"):
        load_verifier(big)
    node = generate_node_keys(tmp_path / "n", 1)[0]  # EC P-384, not Ed25519
    with pytest.raises(SignatureError, match="not an Ed25519"):
        load_signer(node.private_key)
    with pytest.raises(SignatureError, match="not an Ed25519"):
        load_verifier(node.public_key)


def test_key_from_option_or_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files = generate_signing_key(tmp_path)
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert signer_from(None) is None and verifier_from(None) is None
    monkeypatch.setenv(ENV_VAR, str(files.private_key))
    signer = signer_from(None)
    assert signer is not None and signer.key_id == files.key_id
    verifier = verifier_from(str(files.public_key))  # the option wins over the environment
    assert verifier is not None and verifier.key_id == files.key_id


def test_cli_signing_key(tmp_path: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(app, ["deploy", "signing-key", "--out", str(tmp_path), "--name", "k"])
    assert res.exit_code == 0, res.output
    assert "key id       ed25519:" in res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k", "k.pub"]
    res = runner.invoke(app, ["deploy", "signing-key", "--out", str(tmp_path), "--name", "k"])
    assert res.exit_code == 1
    assert "refusing to overwrite" in res.output and len(res.output.strip().splitlines()) == 1
