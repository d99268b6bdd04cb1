"""Trusted apps: the operator signs the FAB; SuperNodes with ``--trusted-entities`` run only it.

How Flower 1.42 carries FAB signatures (read from its installed source): a SuperNode started
with ``--trusted-entities FILE`` (YAML ``{public_key_id: "ssh-ed25519 AAAA..."}``) refuses
any FAB whose ``verifications`` lack ``valid_license``, and otherwise needs one entry
``{public_key_id: {"signature": b64url, "signed_at": unix_s}}`` whose Ed25519 signature over
``signed_at (8 bytes big-endian) || SHA-256(FAB)`` a trusted key verifies
(``flwr.supernode.start_client_internal._verify_fab``). The SuperLink attaches such
verifications only to apps it fetches from an app hub (``flwr run @publisher/app==x.y.z``):
it POSTs ``{app_id, app_version, flwr_version}`` to ``$FLWR_SUPERGRID_API_URL/hub/fetch-fab``
and downloads the returned ``fab_url``. A FAB pushed by ``flwr run .`` carries none.

So leanfed's self-hosted path is that hub protocol, served by :class:`AppRegistry` on the
SuperLink host's loopback from a folder of FABs signed by ``leanfed deploy sign-app``, with
the SuperLink started with ``FLWR_SUPERGRID_API_URL=http://127.0.0.1:PORT/v1``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import time
import tomllib
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from server.security.errors import DeployError
from server.security.signing import Signer, load_verifier, openssh_public

MAX_REQUEST_BYTES = 4096  # a fetch-fab request is ~100 bytes of JSON
_APP_ID = re.compile(r"^@[a-zA-Z0-9][a-zA-Z0-9_-]*/[a-zA-Z0-9][a-zA-Z0-9_-]*$")
_VERSION = re.compile(r"^\d+\.\d+\.\d+$")


def fab_message(fab: bytes, signed_at: int) -> bytes:
    """What a FAB signature covers, byte for byte as Flower's verifier rebuilds it."""
    return signed_at.to_bytes(8, byteorder="big") + hashlib.sha256(fab).digest()


def sign_fab(fab: bytes, signer: Signer, signed_at: int | None = None) -> dict[str, Any]:
    """One hub verification record: public_key_id, b64url signature, signed_at."""
    when = int(time.time()) if signed_at is None else signed_at
    sig = signer.private_key.sign(fab_message(fab, when))
    return {
        "public_key_id": signer.key_id,
        "signature": base64.urlsafe_b64encode(sig).rstrip(b"=").decode("ascii"),
        "signed_at": when,
    }


def app_identity(app_dir: Path | str) -> tuple[str, str]:
    """(``@publisher/name``, version) of a Flower App folder, as the SuperLink derives them."""
    path = Path(app_dir) / "pyproject.toml"
    try:
        cfg = tomllib.loads(path.read_text(encoding="utf-8"))
        app_id = f"@{cfg['tool']['flwr']['app']['publisher']}/{cfg['project']['name']}"
        version = str(cfg["project"]["version"])
    except (OSError, tomllib.TOMLDecodeError, KeyError, TypeError) as err:
        raise DeployError(f"{path} is not a Flower App pyproject ({type(err).__name__})") from None
    if not _APP_ID.match(app_id) or not _VERSION.match(version):
        raise DeployError(f"app id {app_id!r} / version {version!r} are not hub-style (x.y.z)")
    return app_id, version


@dataclass(frozen=True)
class SignedApp:
    """A FAB and its verification record in a registry folder."""

    app_id: str
    version: str
    fab: Path
    verification: Path

    @property
    def spec(self) -> str:
        """What to pass to ``flwr run``: ``@publisher/name==x.y.z``."""
        return f"{self.app_id}=={self.version}"


def _stem(app_id: str, version: str) -> str:
    return app_id[1:].replace("/", "__") + f"__{version}"


def write_signed_app(
    fab: bytes, app_id: str, version: str, out_dir: Path | str, signer: Signer
) -> SignedApp:
    """Write ``FAB`` and its ``.sig.json`` (hub verification list) into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = _stem(app_id, version)
    fab_path, ver_path = out / f"{stem}.fab", out / f"{stem}.sig.json"
    fab_path.write_bytes(fab)
    record = {"app_id": app_id, "version": version, "verifications": [sign_fab(fab, signer)]}
    ver_path.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    return SignedApp(app_id, version, fab_path, ver_path)


def sign_app_dir(app_dir: Path | str, out_dir: Path | str, signer: Signer) -> SignedApp:
    """Build the FAB of a Flower App folder exactly as ``flwr run``/``flwr build`` do, sign it."""
    from flwr.cli.build import build_fab_from_disk  # the bundle Flower itself would send

    app_id, version = app_identity(app_dir)
    fab = build_fab_from_disk(Path(app_dir).resolve())
    return write_signed_app(fab, app_id, version, out_dir, signer)


def write_trusted_entities(path: Path | str, public_keys: list[Path]) -> Path:
    """``--trusted-entities`` YAML: ``key_id: "ssh-ed25519 ..."`` per trusted public key."""
    if not public_keys:
        raise DeployError("name at least one trusted public key")
    lines = []
    for pub in public_keys:
        verifier = load_verifier(pub)
        lines.append(f'"{verifier.key_id}": "{openssh_public(verifier.public_key)}"')
    out = Path(path)
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out


class AppRegistry:
    """Flower's hub ``fetch-fab`` protocol over a folder of signed apps, on one local port.

    Serves ``POST /v1/hub/fetch-fab`` and ``GET /fabs/<stem>.fab``; nothing else. Runs in a
    daemon thread (``start``/``stop``) or in the foreground (``serve_forever``).
    """

    def __init__(self, folder: Path | str, host: str = "127.0.0.1", port: int = 0) -> None:
        self.folder = Path(folder)
        registry = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # quiet: the SuperLink logs the fetch
                return

            def _reply(self, code: int, body: bytes, kind: str = "application/json") -> None:
                self.send_response(code)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                size = int(self.headers.get("Content-Length") or 0)
                if self.path != "/v1/hub/fetch-fab":
                    return self._reply(404, b'{"detail":"not found"}')
                if not 0 < size <= MAX_REQUEST_BYTES:
                    return self._reply(413, b'{"detail":"request too large"}')
                try:
                    req = json.loads(self.rfile.read(size))
                    found = registry.lookup(str(req["app_id"]), req.get("app_version"))
                except (ValueError, KeyError, TypeError):
                    return self._reply(400, b'{"detail":"bad request"}')
                if found is None:
                    return self._reply(404, b'{"detail":"no such signed app"}')
                body = {
                    "fab_url": f"{registry.base_url}/fabs/{found.fab.name}",
                    "verifications": json.loads(found.verification.read_text())["verifications"],
                }
                return self._reply(200, json.dumps(body).encode())

            def do_GET(self) -> None:  # noqa: N802
                name = self.path.removeprefix("/fabs/")
                path = registry.folder / name
                if (
                    not self.path.startswith("/fabs/")
                    or "/" in name
                    or not name.endswith(".fab")
                    or not path.is_file()
                ):
                    return self._reply(404, b"not found", "text/plain")
                return self._reply(200, path.read_bytes(), "application/octet-stream")

        self.server = ThreadingHTTPServer((host, port), Handler)
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        """``http://host:port`` the registry listens on."""
        host, port = self.server.server_address[0], self.server.server_address[1]
        return f"http://{host!s}:{int(port)}"

    @property
    def api_url(self) -> str:
        """The value of ``FLWR_SUPERGRID_API_URL`` for the SuperLink."""
        return f"{self.base_url}/v1"

    def lookup(self, app_id: str, version: Any) -> SignedApp | None:
        """The signed app ``app_id`` at ``version`` (the newest version when None)."""
        if not _APP_ID.match(app_id) or (version is not None and not _VERSION.match(str(version))):
            return None
        found = []
        for ver in self.folder.glob("*.sig.json"):
            try:
                rec = json.loads(ver.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            fab = ver.with_name(ver.name.removesuffix(".sig.json") + ".fab")
            rec_version = str(rec.get("version"))
            if rec.get("app_id") == app_id and _VERSION.match(rec_version) and fab.is_file():
                found.append(SignedApp(app_id, rec_version, fab, ver))
        if version is not None:
            found = [a for a in found if a.version == str(version)]
        found.sort(key=lambda a: tuple(int(p) for p in a.version.split(".")))
        return found[-1] if found else None

    def start(self) -> AppRegistry:
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self.server.serve_forever()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
