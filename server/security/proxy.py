"""Reverse-proxy configuration: sites reach only the SuperLink's Fleet API, through nginx.

Flower 1.42 serves every SuperLink API on one port, under path prefixes (read from its
FastAPI routers): ``/v1/fleet/*`` for SuperNodes, ``/v1/control/*`` for the ``flwr`` CLI
(start/list/stop runs, register/unregister SuperNode keys), ``/v1/runtime/*`` for the
ServerApp processes, ``/health``. The SuperLink therefore listens on loopback (or an
operator-only network) and nginx, on the address sites reach, forwards ``/v1/fleet/`` and
``/health`` and answers 403 to everything else: a site can neither list runs nor register
a key. TLS is terminated at nginx with the SuperLink's certificate, and nginx re-encrypts to
the SuperLink, verifying it against the CA (SuperNode authentication needs a TLS SuperLink;
it signs a timestamp header, which nginx passes through untouched).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from server.security.errors import DeployError
from server.security.tls import TLSFiles

ALLOWED_PREFIXES = ("/v1/fleet/",)  # plus exactly /health
DEFAULT_MAX_BODY = "512m"  # sparse updates are small, but a dense model or FAB may not be


@dataclass(frozen=True)
class ProxyFiles:
    """A self-contained nginx prefix: ``nginx -p PREFIX -c CONF`` runs it."""

    prefix: Path
    conf: Path

    def command(self, nginx: str = "nginx") -> list[str]:
        """Foreground nginx (``daemon off``), so it is stopped by its pid."""
        return [nginx, "-p", str(self.prefix), "-c", str(self.conf), "-e", "stderr"]


def nginx_binary() -> str | None:
    """Path of nginx (Debian installs it in /usr/sbin, often not on a user's PATH)."""
    found = shutil.which("nginx")
    if found:
        return found
    return "/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None


def nginx_conf(
    listen: str,
    upstream: str,
    tls: TLSFiles,
    *,
    upstream_name: str = "localhost",
    prefix: Path | str = ".",
    max_body: str = DEFAULT_MAX_BODY,
) -> str:
    """The nginx.conf text: ``listen`` (host:port sites use) -> ``upstream`` (SuperLink).

    ``upstream_name`` is the DNS name nginx checks the SuperLink's certificate against
    (nginx matches DNS subjectAltNames only, not IP ones; `deploy certs` adds localhost).
    """
    for value, what in ((listen, "listen"), (upstream, "upstream"), (max_body, "max_body")):
        if not value or any(c in value for c in " ;{}\"'\n\\"):
            raise DeployError(f"{what} {value!r} may not be empty or hold spaces, quotes or ;{{}}")
    p = Path(prefix)
    return f"""# leanfed: sites reach only the SuperLink's Fleet API (server/security/proxy.py).
daemon off;
worker_processes 1;
pid {p / "nginx.pid"};
error_log {p / "error.log"} warn;
events {{ worker_connections 256; }}
http {{
    access_log {p / "access.log"};
    client_body_temp_path {p / "tmp-body"};
    proxy_temp_path {p / "tmp-proxy"};
    fastcgi_temp_path {p / "tmp-fastcgi"};
    uwsgi_temp_path {p / "tmp-uwsgi"};
    scgi_temp_path {p / "tmp-scgi"};
    server_tokens off;
    upstream superlink {{ server {upstream}; }}
    server {{
        listen {listen} ssl;
        ssl_certificate {tls.server_cert.resolve()};
        ssl_certificate_key {tls.server_key.resolve()};
        ssl_protocols TLSv1.2 TLSv1.3;
        client_max_body_size {max_body};
        # Keep request bodies in memory: the worker (not root) cannot write the temp dir,
        # and a SecAgg+ masked vector or a large update is bigger than the 16 KB default.
        client_body_buffer_size {max_body};

        # The Fleet API: what a SuperNode calls (register is refused by the SuperLink
        # itself when --enable-supernode-auth is on; activate needs a registered key).
        location /v1/fleet/ {{
            proxy_pass https://superlink;
            proxy_http_version 1.1;
            proxy_ssl_trusted_certificate {tls.ca_cert.resolve()};
            proxy_ssl_verify on;
            proxy_ssl_name {upstream_name};
            proxy_ssl_server_name on;
            proxy_read_timeout 300s;
            proxy_send_timeout 300s;
            proxy_request_buffering off;  # stream bodies to the SuperLink, no temp files
            proxy_buffering off;
        }}
        location = /health {{
            proxy_pass https://superlink;
            proxy_ssl_trusted_certificate {tls.ca_cert.resolve()};
            proxy_ssl_verify on;
            proxy_ssl_name {upstream_name};
        }}
        # Control API (runs, SuperNode keys), Runtime API, docs: operators only.
        location / {{ return 403; }}
    }}
}}
"""


def write_proxy(
    out_dir: Path | str,
    listen: str,
    upstream: str,
    tls: TLSFiles,
    *,
    upstream_name: str = "localhost",
    max_body: str = DEFAULT_MAX_BODY,
) -> ProxyFiles:
    """Write ``out_dir/nginx.conf`` (with its own pid, logs and temp paths in ``out_dir``)."""
    prefix = Path(out_dir).resolve()
    prefix.mkdir(parents=True, exist_ok=True)
    conf = prefix / "nginx.conf"
    conf.write_text(
        nginx_conf(
            listen, upstream, tls, upstream_name=upstream_name, prefix=prefix, max_body=max_body
        ),
        encoding="utf-8",
    )
    return ProxyFiles(prefix=prefix, conf=conf)
