"""Detect secrets in run configs so that passwords, tokens and keys never enter the run store."""

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
        "cookie",
        "sessionkey",
    }
)
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
    re.compile(r"^[a-z][a-z0-9+.-]*://[^/\s:@]*:[^/\s@]+@", re.IGNORECASE),  # scheme://user:pw@
)
_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")


def _words(key: str) -> list[str]:
    return [w for w in re.split(r"[^a-z0-9]+", _CAMEL.sub("_", key).lower()) if w]


def is_secret_key(key: str) -> bool:
    """True when a config key name looks like it holds a password, token or key material."""
    words = _words(key)
    if any(w in _SECRET_WORDS for w in words):
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
