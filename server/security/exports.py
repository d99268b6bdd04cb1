"""Signed exports: a manifest of every exported file (SHA-256, size), signed by the server key.

``leanfed export`` (server/export.py) checks the run first with :func:`check_export` (the
same policy as resume: a signed run needs the key and valid signatures) and then calls
:func:`sign_export` on its output folder; whoever receives the folder runs
``leanfed deploy verify-export DIR --signing-key KEY.pub``. Any added, removed or changed
file, or another key, is refused.
"""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path
from typing import Any

from server.security.checkpoints import check_resume
from server.security.errors import SignatureError
from server.security.signing import Signer, Verifier
from server.store import RunStore

DOMAIN = "leanfed-export/1"
SIGNATURE_FILE = "SIGNATURE.json"
MAX_SIGNATURE_FILE = 1 << 20  # a manifest of a few files is < 4 KB


def check_export(store: RunStore, run_id: str, verifier: Verifier | None) -> None:
    """Refuse to export a run whose checkpoints do not verify (same policy as resume)."""
    check_resume(store, run_id, verifier, action="exporting")


def _manifest(folder: Path) -> dict[str, dict[str, Any]]:
    files: dict[str, dict[str, Any]] = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if rel == SIGNATURE_FILE or path.is_dir():
            continue
        if path.is_symlink() or not path.is_file():
            raise SignatureError(f"{folder}: {rel} is not a regular file; refusing to sign it")
        h = hashlib.sha256()
        with path.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        files[rel] = {"sha256": h.hexdigest(), "size": path.stat().st_size}
    if not files:
        raise SignatureError(f"{folder}: no files to sign")
    return files


def sign_export(folder: Path | str, signer: Signer) -> Path:
    """Write ``folder/SIGNATURE.json``: key id, file manifest, Ed25519 signature over both."""
    root = Path(folder)
    payload = {"key_id": signer.key_id, "files": _manifest(root)}
    record = {
        **payload,
        "signature": base64.b64encode(signer.sign(DOMAIN, payload)).decode("ascii"),
    }
    out = root / SIGNATURE_FILE
    out.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    return out


def verify_export(folder: Path | str, verifier: Verifier) -> int:
    """Check ``folder`` against its SIGNATURE.json; return how many files it covers."""
    root = Path(folder)
    sig_path = root / SIGNATURE_FILE
    what = f"export {root}"
    if not sig_path.is_file():
        raise SignatureError(f"{what} is unsigned (no {SIGNATURE_FILE})")
    if sig_path.stat().st_size > MAX_SIGNATURE_FILE:
        raise SignatureError(f"{what}: {SIGNATURE_FILE} is too large to be a manifest")
    try:
        record = json.loads(sig_path.read_text(encoding="utf-8"))
        key, files = str(record["key_id"]), record["files"]
        signature = base64.b64decode(record["signature"], validate=True)
    except (ValueError, KeyError, TypeError):
        raise SignatureError(f"{what}: {SIGNATURE_FILE} is malformed") from None
    if key != verifier.key_id:
        raise SignatureError(f"{what} is signed by {key}, not {verifier.key_id}")
    verifier.verify(DOMAIN, {"key_id": key, "files": files}, signature, what)
    actual = _manifest(root)
    if actual != files:
        changed = sorted(set(actual) ^ set(files)) or sorted(
            k for k in actual if actual[k] != files.get(k)
        )
        raise SignatureError(f"{what}: files differ from the signed manifest: {changed[:5]}")
    return len(files)
