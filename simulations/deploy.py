"""`leanfed deploy ...`: a thin typer layer over server.security (keys, certificates, apps)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, NoReturn

import typer

from client.sitecheck import check_site_data
from server.security.apps import AppRegistry, sign_app_dir, write_trusted_entities
from server.security.errors import DeployError
from server.security.exports import sign_export, verify_export
from server.security.node_keys import generate_node_keys
from server.security.proxy import write_proxy
from server.security.signing import generate_signing_key, signer_from, verifier_from
from server.security.tls import DEFAULT_HOSTS, TLSFiles, generate_tls
from server.store import StoreError
from simulations.edge import new_app, print_error

deploy_app = new_app(
    no_args_is_help=True,
    help="Keys, certificates, signed apps and site checks for a real deployment.",
)
OutOption = Annotated[Path, typer.Option("--out", help="Folder to write into")]


def fail(message: str) -> NoReturn:
    """One red line on stderr, exit code 1 (never a traceback, never data)."""
    print_error(message)
    raise typer.Exit(code=1)


@deploy_app.command("certs")
def certs(
    out: Annotated[Path, typer.Option("--out", help="Folder for ca.crt, server.pem, keys")],
    host: Annotated[
        list[str] | None,
        typer.Option("--host", help="SuperLink name or IP (repeat); default 127.0.0.1"),
    ] = None,
    days: Annotated[int, typer.Option(help="Validity in days")] = 365,
    key_type: Annotated[str, typer.Option("--key-type", help="ec | rsa")] = "ec",
) -> None:
    """Generate a CA and a SuperLink server certificate signed by it."""
    try:
        hosts = tuple(host) if host else DEFAULT_HOSTS
        files = generate_tls(out, hosts, days=days, key_type=key_type)
    except DeployError as err:
        raise typer.BadParameter(str(err)) from err
    typer.echo(f"CA certificate   {files.ca_cert}  (give to SuperNodes and the flwr CLI)")
    typer.echo(f"CA private key   {files.ca_key}  (keep offline)")
    typer.echo(f"server cert/key  {files.server_cert} {files.server_key}  (SuperLink only)")


@deploy_app.command("keys")
def keys(
    out: Annotated[Path, typer.Option("--out", help="Folder for the key pairs")],
    nodes: Annotated[int, typer.Option("--nodes", help="How many SuperNodes")] = 1,
    prefix: Annotated[str, typer.Option(help="File name prefix")] = "node",
) -> None:
    """Generate SuperNode authentication key pairs (EC P-384, OpenSSH format)."""
    try:
        pairs = generate_node_keys(out, nodes, prefix=prefix)
    except DeployError as err:
        raise typer.BadParameter(str(err)) from err
    for pair in pairs:
        typer.echo(f"{pair.private_key}  (site only)  {pair.public_key}  (register)")


@deploy_app.command("signing-key")
def signing_key(
    out: OutOption,
    name: Annotated[str, typer.Option(help="File name of the key")] = "leanfed-signing",
) -> None:
    """Generate the server's Ed25519 signing key (checkpoints, exported models, apps)."""
    try:
        files = generate_signing_key(out, name)
    except (DeployError, StoreError) as err:
        fail(str(err))
    typer.echo(f"private key  {files.private_key}  (server host only, 0600; never in the store)")
    typer.echo(f"public key   {files.public_key}  (sites' trusted entities, verifiers)")
    typer.echo(f"key id       {files.key_id}")
    typer.echo(f"use it:      export LEANFED_SIGNING_KEY={files.private_key.resolve()}")


KeyOption = Annotated[
    str | None,
    typer.Option("--signing-key", help="Ed25519 private key; default $LEANFED_SIGNING_KEY"),
]


@deploy_app.command("sign-app")
def sign_app(
    out: Annotated[Path, typer.Option("--out", help="App registry folder (FABs + signatures)")],
    app_dir: Annotated[Path, typer.Argument(help="Flower App folder")] = Path("."),
    signing_key: KeyOption = None,
) -> None:
    """Build the app's FAB as `flwr run` would and sign it for sites' --trusted-entities."""
    try:
        signer = signer_from(signing_key)
        if signer is None:
            fail("no signing key: pass --signing-key or set LEANFED_SIGNING_KEY")
        signed = sign_app_dir(app_dir, out, signer)
    except (DeployError, StoreError) as err:
        fail(str(err))
    typer.echo(f"signed FAB   {signed.fab}  ({signed.verification.name})")
    typer.echo(f"key id       {signer.key_id}")
    typer.echo(f"run it:      flwr run {signed.spec} CONNECTION")


@deploy_app.command("sign-export")
def sign_export_cmd(
    folder: Annotated[Path, typer.Argument(help="Folder written by `leanfed export`")],
    signing_key: KeyOption = None,
) -> None:
    """Sign every file of an exported model folder (writes SIGNATURE.json)."""
    signer = signer_from(signing_key)
    if signer is None:
        fail("no signing key: pass --signing-key or set LEANFED_SIGNING_KEY")
    typer.echo(f"wrote {sign_export(folder, signer)} (key {signer.key_id})")


@deploy_app.command("verify-export")
def verify_export_cmd(
    folder: Annotated[Path, typer.Argument(help="Exported model folder")],
    signing_key: Annotated[
        str | None, typer.Option("--signing-key", help="Public (or private) signing key")
    ] = None,
) -> None:
    """Check an exported model folder against its SIGNATURE.json."""
    verifier = verifier_from(signing_key)
    if verifier is None:
        fail("no key to verify with: pass --signing-key or set LEANFED_SIGNING_KEY")
    typer.echo(f"valid: {verify_export(folder, verifier)} files signed by {verifier.key_id}")


@deploy_app.command("trusted-entities")
def trusted_entities(
    out: Annotated[Path, typer.Option("--out", help="YAML file for flower-supernode")],
    public_key: Annotated[list[Path], typer.Argument(help="Trusted signing public key(s)")],
) -> None:
    """Write the `--trusted-entities` YAML a site's SuperNode runs with."""
    try:
        path = write_trusted_entities(out, public_key)
    except (DeployError, StoreError) as err:
        fail(str(err))
    typer.echo(f"wrote {path}; start sites with: flower-supernode ... --trusted-entities {path}")


@deploy_app.command("app-registry")
def app_registry(
    folder: Annotated[Path, typer.Option("--dir", help="Folder written by `sign-app`")],
    port: Annotated[int, typer.Option(help="Loopback port")] = 9180,
) -> None:
    """Serve signed FABs to the SuperLink (Flower's hub protocol) on 127.0.0.1 until Ctrl-C."""
    if not folder.is_dir():
        fail(f"{folder} is not a folder")
    registry = AppRegistry(folder, "127.0.0.1", port)
    typer.echo(f"start the SuperLink with FLWR_SUPERGRID_API_URL={registry.api_url}")
    try:
        registry.serve_forever()
    except KeyboardInterrupt:
        registry.stop()


@deploy_app.command("proxy")
def proxy(
    out: Annotated[Path, typer.Option("--out", help="nginx prefix folder for nginx.conf")],
    certs: Annotated[Path, typer.Option("--certs", help="Folder written by `deploy certs`")],
    listen: Annotated[str, typer.Option(help="host:port sites connect to")] = "0.0.0.0:9093",
    upstream: Annotated[
        str, typer.Option(help="host:port of the SuperLink (loopback / operator network)")
    ] = "127.0.0.1:9091",
    upstream_name: Annotated[
        str, typer.Option(help="DNS name in the SuperLink certificate")
    ] = "localhost",
) -> None:
    """nginx config that exposes only the Fleet API to sites (Control API stays operator-only)."""
    tls = TLSFiles(
        ca_cert=certs / "ca.crt",
        ca_key=certs / "ca.key",
        server_cert=certs / "server.pem",
        server_key=certs / "server.key",
    )
    missing = [p.name for p in (tls.ca_cert, tls.server_cert, tls.server_key) if not p.is_file()]
    if missing:
        fail(f"{certs} lacks {', '.join(missing)} (run `leanfed deploy certs` first)")
    try:
        files = write_proxy(out, listen, upstream, tls, upstream_name=upstream_name)
    except DeployError as err:
        fail(str(err))
    typer.echo(f"wrote {files.conf}; run: {' '.join(files.command())}")


@deploy_app.command("check-data")
def check_data(
    file: Annotated[Path, typer.Argument(help="The site's .npz or .csv file")],
    config: Annotated[
        Path | None, typer.Option("--config", help="The run's TOML run-config overrides")
    ] = None,
    require_all_classes: Annotated[
        bool, typer.Option("--require-all-classes", help="Fail when a class has no examples")
    ] = False,
) -> None:
    """Check a site's data file against a run's config before the site joins (never prints data)."""
    from simulations.simulate import build_config  # the run config exactly as `simulate` reads it

    report = check_site_data(file, build_config(config, None, {}))
    missing = report.missing_classes
    typer.echo(f"file            {report.path}")
    typer.echo(f"examples        {report.train_examples} train, {report.test_examples} test")
    typer.echo(f"example shape   {report.input_shape}")
    covered = report.num_classes - len(missing)
    typer.echo(f"classes         {covered} of {report.num_classes} present in training data")
    typer.echo(f"per class       {report.class_counts}")
    if missing:
        note = f"classes {missing} have no training examples"
        if require_all_classes:
            fail(f"{report.path}: {note}")
        typer.echo(f"warning         {note} (the site still helps on the others)")
    typer.echo("ok: this file can join the run")


def register(app: typer.Typer) -> None:
    """Add ``leanfed deploy ...`` to the ``leanfed`` CLI."""
    app.add_typer(deploy_app, name="deploy")
