"""Sites run only trusted apps: FAB signatures checked by Flower's own verifier and by a real
SuperNode started with ``--trusted-entities``.

The attack of issue 10: whoever can start a run ships code that then runs at every site.
The integration test brings up a real SuperLink, SuperNode and leanfed's app registry on
loopback (free ports), and starts a probe app three ways: signed by the operator's key (it
runs: its ClientApp leaves a marker at the site), unsigned through ``flwr run DIR``, and
signed by a foreign key. The last two must be refused before any of their code runs.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from flwr.supercore.fab import Fab
from flwr.supernode.start_client_internal import _verify_fab

from server.security import flower, processes
from server.security.apps import (
    AppRegistry,
    sign_app_dir,
    sign_fab,
    write_signed_app,
    write_trusted_entities,
)
from server.security.errors import DeployError
from server.security.signing import Signer, generate_signing_key, load_signer

PROBE_PYPROJECT = """
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "probe"
version = "1.0.0"
dependencies = []

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "{publisher}"

[tool.flwr.app.components]
serverapp = "probe_app:server"
clientapp = "probe_app:client"

[tool.flwr.app.config]
tag = "{tag}"
"""

# The probe: its ClientApp drops a marker file at the site (stand-in for any code an
# attacker would run there); its ServerApp asks every node once and exits.
PROBE_APP = '''
"""Probe app: proves whether a site ran this FAB's code."""
import time
from pathlib import Path

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

server = ServerApp()
client = ClientApp()


@server.main()
def main(grid: Grid, context: Context) -> None:
    deadline = time.monotonic() + 60
    nodes = list(grid.get_node_ids())
    while not nodes and time.monotonic() < deadline:
        time.sleep(0.5)
        nodes = list(grid.get_node_ids())
    msgs = [Message(RecordDict(), dst_node_id=n, message_type="query") for n in nodes]
    replies = list(grid.send_and_receive(msgs, timeout=60))
    print("probe replies", len(replies), [r.has_error() for r in replies], flush=True)


@client.query()
def query(msg: Message, context: Context) -> Message:
    marker = Path(str(context.node_config["marker-dir"])) / str(context.run_config["tag"])
    marker.write_text("ran")
    return Message(RecordDict(), reply_to=msg)
'''


def _probe(root: Path, publisher: str, tag: str) -> Path:
    app = root / f"probe-{tag}"
    app.mkdir(parents=True)
    (app / "pyproject.toml").write_text(PROBE_PYPROJECT.format(publisher=publisher, tag=tag))
    (app / "probe_app.py").write_text(PROBE_APP)
    return app


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("keys")
    own, foreign = generate_signing_key(root, "operator"), generate_signing_key(root, "mallory")
    return {"own": own.private_key, "own_pub": own.public_key, "foreign": foreign.private_key}


def _fab(verifications: list[dict[str, object]], content: bytes) -> Fab:
    v = {r["public_key_id"]: json.dumps({k: r[k] for k in ("signature", "signed_at")})
         for r in verifications}
    return Fab("", content, {**{str(k): s for k, s in v.items()}, "valid_license": "Valid"})


def test_flowers_verifier_accepts_only_the_trusted_key(keys: dict[str, Path]) -> None:
    own, foreign = load_signer(keys["own"]), load_signer(keys["foreign"])
    trusted = {own.key_id: (keys["own_pub"]).read_text().rsplit(" ", 1)[0]}
    fab = b"PK\x03\x04 pretend FAB bytes"
    assert _verify_fab(_fab([sign_fab(fab, own)], fab), trusted)
    assert not _verify_fab(_fab([sign_fab(fab, foreign)], fab), trusted)
    assert not _verify_fab(_fab([sign_fab(fab, own)], fab + b"tampered"), trusted)
    # A foreign key claiming the trusted key's id does not help it.
    forged = {**sign_fab(fab, foreign), "public_key_id": own.key_id}
    assert not _verify_fab(_fab([forged], fab), trusted)


def _post(url: str, body: bytes) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def test_registry_serves_flowers_fetch_fab_protocol(tmp_path: Path, keys: dict[str, Path]) -> None:
    signer = load_signer(keys["own"])
    write_signed_app(b"fab-1", "@leanfed/probe", "1.0.0", tmp_path, signer)
    write_signed_app(b"fab-2", "@leanfed/probe", "1.2.0", tmp_path, signer)
    reg = AppRegistry(tmp_path).start()
    try:
        url = f"{reg.api_url}/hub/fetch-fab"
        code, body = _post(url, b'{"app_id": "@leanfed/probe", "app_version": null}')
        assert code == 200
        reply = json.loads(body)
        assert reply["fab_url"].endswith("leanfed__probe__1.2.0.fab")  # newest when unversioned
        assert [v["public_key_id"] for v in reply["verifications"]] == [signer.key_id]
        with urllib.request.urlopen(reply["fab_url"], timeout=10) as resp:
            assert resp.read() == b"fab-2"
        code, _ = _post(url, b'{"app_id": "@leanfed/probe", "app_version": "9.9.9"}')
        assert code == 404
        assert _post(url, b"not json")[0] == 400
        assert _post(url, b"x" * 5000)[0] == 413
        assert _post(f"{reg.api_url}/control/list-runs", b"{}")[0] == 404
    finally:
        reg.stop()


def test_sign_app_dir_and_trusted_entities(tmp_path: Path, keys: dict[str, Path]) -> None:
    signer = load_signer(keys["own"])
    signed = sign_app_dir(_probe(tmp_path, "leanfed", "x"), tmp_path / "reg", signer)
    assert signed.spec == "@leanfed/probe==1.0.0" and signed.fab.read_bytes()[:2] == b"PK"
    yaml_path = write_trusted_entities(tmp_path / "trusted.yaml", [keys["own_pub"]])
    import yaml

    assert list(yaml.safe_load(yaml_path.read_text())) == [signer.key_id]
    with pytest.raises(DeployError, match="at least one"):
        write_trusted_entities(tmp_path / "t2.yaml", [])


def _flower_installed() -> bool:
    return flower.flower_installed()


def _run(app: str, work: Path, env: dict[str, str], tag: str) -> str:
    log = work / f"flwr-run-{tag}.log"
    res = processes.run_logged(
        ["flwr", "run", app, "link", "--stream"], log, env=env, timeout=150, cwd=work
    )
    return res.output


@pytest.mark.slow
@pytest.mark.timeout(420)
@pytest.mark.skipif(not _flower_installed(), reason="Flower CLI executables not installed")
def test_supernode_runs_only_operator_signed_apps(tmp_path: Path, keys: dict[str, Path]) -> None:
    own, foreign = load_signer(keys["own"]), load_signer(keys["foreign"])
    registry_dir, markers = tmp_path / "registry", tmp_path / "site-markers"
    markers.mkdir()

    def signed(signer: Signer, tag: str) -> str:
        return sign_app_dir(_probe(tmp_path / tag, "leanfed", tag), registry_dir, signer).spec

    ok_spec = signed(own, "trusted")
    # Mallory publishes under her own id, signed with her key.
    foreign_app = _probe(tmp_path / "foreign", "mallory", "foreign")
    foreign_spec = sign_app_dir(foreign_app, registry_dir, foreign).spec
    unsigned_app = _probe(tmp_path / "unsigned", "leanfed", "unsigned")
    trusted = write_trusted_entities(tmp_path / "trusted.yaml", [keys["own_pub"]])

    home = tmp_path / "flwr-home"
    env = flower.flwr_env(home)
    registry = AppRegistry(registry_dir).start()
    env["FLWR_SUPERGRID_API_URL"] = registry.api_url
    port = processes.free_port()
    flower.write_connection(home, "link", f"127.0.0.1:{port}", insecure=True)
    procs = []
    try:
        link = processes.start_process(
            flower.superlink_command(port, None), tmp_path / "superlink.log", env=env, cwd=tmp_path
        )
        procs.append(link)
        processes.wait_for_health(f"127.0.0.1:{port}", proc=link, timeout=60)
        node_cmd = flower.supernode_command(
            f"127.0.0.1:{port}", processes.free_port(), {"marker-dir": str(markers)},
            ca_cert=None, trusted_entities=trusted,
        )
        procs.append(
            processes.start_process(node_cmd, tmp_path / "site.log", env=env, cwd=tmp_path)
        )
        outputs = {
            "trusted": _run(ok_spec, tmp_path, env, "trusted"),
            "unsigned": _run(str(unsigned_app), tmp_path, env, "unsigned"),
            "foreign": _run(foreign_spec, tmp_path, env, "foreign"),
        }
    finally:
        for proc in reversed(procs):
            processes.stop_process(proc)
        registry.stop()
    site_log = (tmp_path / "site.log").read_text(errors="replace")
    context = f"{outputs}\n--- site\n{site_log[-4000:]}"
    # The operator-signed app ran at the site ...
    assert (markers / "trusted").read_text() == "ran", context
    assert "probe replies 1 [False]" in outputs["trusted"], context
    # ... the unsigned and the foreign-signed ones were refused before any code ran.
    assert not (markers / "unsigned").exists(), context
    assert not (markers / "foreign").exists(), context
    assert "probe replies 1 [True]" in outputs["unsigned"], context
    assert "probe replies 1 [True]" in outputs["foreign"], context
    assert "App verification is not supported by the connected SuperLink" in site_log, context
    assert "FAB verification failed" in site_log, context


def test_cli_sign_app_and_trusted_entities(
    tmp_path: Path, keys: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from simulations.cli import app

    runner = CliRunner()
    probe = _probe(tmp_path, "leanfed", "cli")
    monkeypatch.delenv("LEANFED_SIGNING_KEY", raising=False)
    res = runner.invoke(app, ["deploy", "sign-app", str(probe), "--out", str(tmp_path / "r")])
    assert res.exit_code == 1 and "no signing key" in res.output, res.output
    monkeypatch.setenv("LEANFED_SIGNING_KEY", str(keys["own"]))
    res = runner.invoke(app, ["deploy", "sign-app", str(probe), "--out", str(tmp_path / "r")])
    assert res.exit_code == 0 and "flwr run @leanfed/probe==1.0.0" in res.output, res.output
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == [
        "leanfed__probe__1.0.0.fab",
        "leanfed__probe__1.0.0.sig.json",
    ]
    out = tmp_path / "t.yaml"
    args = ["deploy", "trusted-entities", "--out", str(out), str(keys["own_pub"])]
    res = runner.invoke(app, args)
    assert res.exit_code == 0 and out.read_text().startswith('"ed25519:'), res.output
