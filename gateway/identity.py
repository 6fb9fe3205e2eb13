"""Who a request is from, as gateways read it, and why an identity is refused.

By default a gateway verifies the API key the caller presents (``presented_key``:
``Authorization: Bearer <key>`` or a configured header) and takes the identity from the
key's record. In the trusted mode (an auth layer in front verified the caller and sets
X-Api-Key-Id and X-Org-Id itself) the identity is read from those headers instead
(``header_identity``), judged by the id rule.

Ids are judged by the one rule of schemas/ids.py. One that breaks it is refused
before any Redis key is built from it (a ``}`` or ``{`` in an id could alias another
tenant's keys) and before the request is admitted (its event would be refused, so
the request could never be counted). The reason names the header (or field) and
the rule, never the value: an identity header may carry a secret sent by mistake,
and reasons travel into proxies' and clients' logs.
"""

from __future__ import annotations

from quotaflow.schemas.ids import ID_RULE, is_valid_id

DEFAULT_PRESENTED_KEY_HEADER = "X-Api-Key"  # QUOTAFLOW_GATEWAY_KEY_HEADER's default
_OWS = " \t"  # HTTP's optional white space around a header value
TWO_KEYS = "two different API keys presented (Authorization and {header}): send one"

KEY_HEADER = "X-Api-Key-Id"
ORG_HEADER = "X-Org-Id"
HEADERS = (KEY_HEADER, ORG_HEADER)
FIELDS = ("api_key_id", "org_id")


def header_identity(scope: dict) -> tuple[str, str] | None:
    """The X-Api-Key-Id and X-Org-Id request headers (set by an auth layer in front), or
    None when either is missing. Read as latin-1, which takes any byte: whether the
    value is an id is for ``problem`` to say, not for a decoding error."""
    headers = dict(scope.get("headers") or [])
    key, org = headers.get(b"x-api-key-id"), headers.get(b"x-org-id")
    return (key.decode("latin-1"), org.decode("latin-1")) if key and org else None


def problem(api_key_id: object, org_id: object, names: tuple[str, str] = HEADERS) -> str | None:
    """Why (api_key_id, org_id) is not an identity, naming ``names[i]`` of the first id
    that breaks the rule; None when both keep it."""
    for name, value in zip(names, (api_key_id, org_id)):
        if not is_valid_id(value):
            got = f"{len(value)} characters" if isinstance(value, str) else f"a {type(value).__name__}"
            return f"{name}: must be {ID_RULE} (got {got}; the value is not repeated here)"
    return None


def presented_key(authorization: str | None, other: str | None, header: str = DEFAULT_PRESENTED_KEY_HEADER
                  ) -> tuple[str | None, str | None]:
    """(key, None) for the key a request presents, from the Authorization header's Bearer
    credentials or the configured header's value (``other``); (None, None) when it presents
    none; (None, reason) when it presents two different ones (which to believe?). Another
    Authorization scheme (Basic, ...) is not a key and is left alone."""
    bearer = None
    if authorization:
        scheme, _, credentials = authorization.strip(_OWS).partition(" ")
        if scheme.lower() == "bearer":
            bearer = credentials.strip(_OWS) or None
    other = other.strip(_OWS) if other else None
    if bearer and other and bearer != other:
        return None, TWO_KEYS.format(header=header)
    return bearer or other or None, None


def scope_headers(scope: dict) -> dict[str, str]:
    """An ASGI request's headers by lower-case name (the first of repeated ones), read as
    latin-1, which takes any byte."""
    out: dict[str, str] = {}
    for name, value in scope.get("headers") or ():
        out.setdefault(name.decode("latin-1").lower(), value.decode("latin-1"))
    return out
