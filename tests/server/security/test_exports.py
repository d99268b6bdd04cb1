"""Signed exports: the manifest signature catches changed, added and removed files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from server.security.errors import SignatureError
from server.security.exports import SIGNATURE_FILE, sign_export, verify_export
from server.security.signing import Signer, generate_signing_key, load_signer
from simulations.cli import app


@pytest.fixture()
def signed(tmp_path: Path) -> tuple[Path, Signer, Signer]:
    keys = tmp_path / "keys"
    own = load_signer(generate_signing_key(keys, "own").private_key)
    other = load_signer(generate_signing_key(keys, "other").private_key)
    out = tmp_path / "export"
    (out / "sub").mkdir(parents=True)
    (out / "model.pt").write_bytes(b"weights")
    (out / "sub" / "model_card.json").write_text("{}")
    sign_export(out, own)
    return out, own, other


def test_valid_export_verifies(signed: tuple[Path, Signer, Signer]) -> None:
    out, own, _ = signed
    assert verify_export(out, own.verifier) == 2


@pytest.mark.parametrize(
    ("tamper", "needle"),
    [
        (lambda d: (d / "model.pt").write_bytes(b"poisoned"), "differ from the signed"),
        (lambda d: (d / "extra.py").write_text("import os"), "differ from the signed"),
        (lambda d: (d / "sub" / "model_card.json").unlink(), "differ from the signed"),
        (lambda d: (d / SIGNATURE_FILE).unlink(), "unsigned"),
        (lambda d: (d / SIGNATURE_FILE).write_text("{"), "malformed"),
    ],
)
def test_tampered_export_refused(
    signed: tuple[Path, Signer, Signer], tamper: object, needle: str
) -> None:
    out, own, _ = signed
    tamper(out)  # type: ignore[operator]
    with pytest.raises(SignatureError, match=needle):
        verify_export(out, own.verifier)


def test_manifest_rewritten_or_foreign_key_refused(signed: tuple[Path, Signer, Signer]) -> None:
    out, own, other = signed
    with pytest.raises(SignatureError, match="not ed25519"):
        verify_export(out, other.verifier)
    record = json.loads((out / SIGNATURE_FILE).read_text())
    record["files"]["model.pt"]["sha256"] = "0" * 64  # manifest edited to match a new file
    (out / SIGNATURE_FILE).write_text(json.dumps(record))
    with pytest.raises(SignatureError, match="signature does not match"):
        verify_export(out, own.verifier)


def test_cli_sign_and_verify_export(tmp_path: Path) -> None:
    key = generate_signing_key(tmp_path / "k")
    out = tmp_path / "e"
    out.mkdir()
    (out / "model.pt").write_bytes(b"w")
    runner = CliRunner()
    res = runner.invoke(app, ["deploy", "sign-export", str(out), "--signing-key",
                              str(key.private_key)])
    assert res.exit_code == 0, res.output
    args = ["deploy", "verify-export", str(out), "--signing-key", str(key.public_key)]
    res = runner.invoke(app, args)
    assert res.exit_code == 0 and "valid: 1 files" in res.output, res.output
    (out / "model.pt").write_bytes(b"x")
    res = runner.invoke(app, args)
    assert res.exit_code == 1 and len(res.output.strip().splitlines()) == 1, res.output
