"""Secrets out of every message: passwords in URLs, bearer tokens, password-like query
parameters, and the values configured as secrets (API tokens, URL passwords).

One helper, ``redact(text)``, used by every message that can carry a URL or a token
(errors, status lines) and by the logging setup (quotaflow/core/logs.py) on every record,
whatever library logged it. It errs on the side of hiding too much: a message that
loses a few characters is better than a password in a log shipped elsewhere.
"""

from __future__ import annotations

import re
import threading
from urllib.parse import unquote, urlsplit

MASK = "***"
# Shorter configured values are not replaced wherever they appear (they would mangle
# every message); inside a URL or after "Bearer" the patterns below hide them anyway.
MIN_LITERAL_CHARS = 4

# scheme://user:password@host: everything between the first ':' of the user info and the
# last '@' before whitespace (passwords with an unencoded '@' included).
_URL_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^\s:/@]*):(?P<secret>[^\s]*)@")
# scheme://secret@host with no ':' is a user name (or a Redis password) too: keep the
# user name visible only when a password follows, so hide a lone one as well.
_URL_LONE_USERINFO = re.compile(r"(?P<head>(?:redis|rediss|chdb|clickhouse|clickhouses)://)(?P<secret>[^\s:/@]+)@")
_QUERY_SECRET = re.compile(
    r"(?P<head>[?&;](?:password|passwd|pwd|pass|secret|token|access_token|auth|sasl_password)=)(?P<secret>[^&\s\"']*)",
    re.IGNORECASE)
# "Bearer <token>" as in an Authorization header; a token has a digit or punctuation,
# which keeps prose ("a bearer token") readable. Configured tokens are hidden anywhere.
_AUTH_SCHEME = re.compile(r"(?P<head>\b(?:Bearer|Basic)\s+)(?P<secret>(?=[A-Za-z0-9._~+/=-]*[0-9._~+/=-])"
                          r"[A-Za-z0-9._~+/=-]{6,})", re.IGNORECASE)

_lock = threading.Lock()
_literals: tuple[str, ...] = ()


def register(*secrets: str | None) -> None:
    """Add values to hide wherever they appear (API tokens, passwords)."""
    global _literals
    new = {s for s in secrets if isinstance(s, str) and len(s) >= MIN_LITERAL_CHARS}
    if not new:
        return
    with _lock:
        # Longest first, so a secret that contains another is hidden whole.
        _literals = tuple(sorted(set(_literals) | new, key=len, reverse=True))


def url_secrets(url: str | None) -> list[str]:
    """The password (and a lone user info, which Redis takes as a password) of a URL,
    as written and decoded, and any password-like query parameter value."""
    if not url:
        return []
    out: list[str] = []
    try:
        parts = urlsplit(url)
    except ValueError:
        return out
    netloc = parts.netloc
    if "@" in netloc:
        userinfo = netloc.rsplit("@", 1)[0]
        user, sep, password = userinfo.partition(":")
        out += [password, unquote(password)] if sep else [user, unquote(user)]
    for m in _QUERY_SECRET.finditer("?" + parts.query if parts.query else ""):
        out += [m["secret"], unquote(m["secret"])]
    return [s for s in out if s]


def redact(text: object) -> str:
    """``text`` as a string with every secret replaced by ***."""
    s = text if isinstance(text, str) else str(text)
    for literal in _literals:
        if literal in s:
            s = s.replace(literal, MASK)
    s = _URL_PASSWORD.sub(lambda m: f"{m['head']}:{MASK}@", s)
    s = _URL_LONE_USERINFO.sub(lambda m: f"{m['head']}{MASK}@", s)
    s = _QUERY_SECRET.sub(lambda m: m["head"] + MASK, s)
    s = _AUTH_SCHEME.sub(lambda m: m["head"] + MASK, s)
    return s


def redact_value(value: object) -> object:
    """Strings redacted inside lists, tuples and dicts; numbers, booleans and None as they
    are; anything else as its redacted str() (it would be printed as that anyway)."""
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {redact(k) if isinstance(k, str) else k: redact_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [redact_value(v) for v in value]
    return redact(value)
