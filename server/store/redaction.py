"""Detect secrets in every string bound for the run store: passwords, tokens, keys never enter.

Keys are judged by their words (``db.pw``, ``apiKey``, ``connection-string``), values by their
shape (``scheme://user:password@``, ``Bearer …``, ``?password=…``, JWTs, PEM private keys,
well-known token prefixes). A refusal names the key path, never the value.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from typing import Any

# Key names are split into lower-case words on any non-alphanumeric character and on camelCase
# boundaries ("apiKey" -> ["api", "key"], "tls.private-key" -> ["tls", "private", "key"]).
_SECRET_WORDS = frozenset(
    {
        "password",
        "passwd",
        "passphrase",
        "pwd",
        "secret",
        "secrets",
        "apikey",
        "credential",
        "credentials",
        "privatekey",
        "authorization",
        "auth",
        "cookie",
        "sessionkey",
        "pw",
        "pass",
        "dsn",
        "jwt",
        "bearer",
        "connstr",
        "connectionstring",
    }
)
# Adjacent word pairs that name a secret together ("connection-string", "conn_str").
_SECRET_PAIRS = frozenset({("connection", "string"), ("conn", "string"), ("conn", "str")})
# "key" alone is too common in ML configs ("dataset-key"), so it only counts next to these words.
_KEY_QUALIFIERS = frozenset(
    {
        "api",
        "private",
        "secret",
        "access",
        "signing",
        "encryption",
        "client",
        "ssh",
        "auth",
        "session",
        "master",
        "hmac",
        "aes",
        "rsa",
    }
)
# Values that are key material or carry a password whatever their key is called.
_SECRET_VALUE_PATTERNS = (
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    re.compile(r"[a-z][a-z0-9+.-]*://[^/\s:@]*:[^/\s@]+@", re.IGNORECASE),  # scheme://user:pw@
    re.compile(r"\b(bearer|basic|token)\s+[a-z0-9._~+/=-]{8,}", re.IGNORECASE),  # auth headers
    # ?password=..., &api_key=..., libpq "host=h password=x"
    re.compile(
        r"(^|[?&;\s])(password|passwd|pwd|pw|pass|secret|token|access_token|api[_-]?key|"
        r"apikey|auth|sig|signature|jwt)\s*=\s*[^&\s]+",
        re.IGNORECASE,
    ),
    re.compile(r"\beyJ[a-z0-9_-]{8,}\.[a-z0-9_-]{8,}\.[a-z0-9_-]*", re.IGNORECASE),  # JWT
    # Well-known credential prefixes: GitHub, OpenAI-style, Slack, AWS access keys, Hugging Face.
    re.compile(r"\b(ghp_|gho_|github_pat_|sk-|xox[abpr]-|hf_)[a-z0-9_-]{16,}", re.IGNORECASE),
    re.compile(r"\bAKIA[0-9A-Z]{16}\b"),
)
_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")


def _words(key: str) -> list[str]:
    return [w for w in re.split(r"[^a-z0-9]+", _CAMEL.sub("_", key).lower()) if w]


def is_secret_key(key: str) -> bool:
    """True when a config key name looks like it holds a password, token or key material."""
    words = _words(key)
    if any(w in _SECRET_WORDS for w in words):
        return True
    if any(pair in _SECRET_PAIRS for pair in zip(words, words[1:], strict=False)):
        return True
    # "token" names a secret only as the last word ("hf-token", "access_token"); model configs
    # use it for sequence items ("max-token-len", "num-tokens").
    if words and words[-1] == "token":
        return True
    return any(
        a in _KEY_QUALIFIERS and b in ("key", "keys")
        for a, b in zip(words, words[1:], strict=False)
    )


def is_secret_value(value: object) -> bool:
    """True when a string value is key material or a URL with an embedded password."""
    return isinstance(value, str) and any(p.search(value) for p in _SECRET_VALUE_PATTERNS)


def _walk(obj: object, path: str) -> Iterator[str]:
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            sub = f"{path}.{k}" if path else str(k)
            if is_secret_key(str(k)) or is_secret_value(v):
                yield sub
            else:
                yield from _walk(v, sub)
    elif isinstance(obj, list | tuple):
        for i, v in enumerate(obj):
            sub = f"{path}[{i}]"
            if is_secret_value(v):
                yield sub
            else:
                yield from _walk(v, sub)


def find_secrets(config: Mapping[str, Any]) -> list[str]:
    """Dotted paths of every entry in `config` (nested too) that looks secret; [] when clean."""
    return list(_walk(config, ""))


def find_secrets_in(value: object, path: str) -> list[str]:
    """Like find_secrets for any value: a bare string is judged by its shape, under `path`."""
    if isinstance(value, Mapping):
        return [f"{path}.{p}" for p in find_secrets(value)]
    if isinstance(value, list | tuple):
        return list(_walk({path: list(value)}, ""))
    return [path] if is_secret_value(value) else []


def scrub_text(text: str) -> str:
    """Free text (an error message) with every secret-looking span replaced by ``***``."""
    for pattern in _SECRET_VALUE_PATTERNS:
        text = pattern.sub("***", text)
    return text


def redact_secrets(config: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of `config` without the secret-looking entries (for callers that prefer stripping)."""

    def strip(obj: object) -> Any:
        if isinstance(obj, Mapping):
            return {
                str(k): strip(v)
                for k, v in obj.items()
                if not (is_secret_key(str(k)) or is_secret_value(v))
            }
        if isinstance(obj, list | tuple):
            return [strip(v) for v in obj if not is_secret_value(v)]
        return obj

    out = strip(config)
    assert isinstance(out, dict)
    return out


REDACTED = "[redacted]"


def mask_secrets(obj: object) -> Any:
    """A copy of `obj` with secret-looking entries masked, for data a site sends (never refused:
    a hostile site must not be able to fail a run by naming a metric "password")."""
    if isinstance(obj, Mapping):
        return {
            k: REDACTED if is_secret_key(str(k)) else mask_secrets(v) for k, v in obj.items()
        }
    if isinstance(obj, list | tuple):
        return [mask_secrets(v) for v in obj]
    if isinstance(obj, str) and is_secret_value(obj):
        return scrub_text(obj)
    return obj
