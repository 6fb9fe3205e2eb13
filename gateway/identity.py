"""Who a request is from, as gateways read it, and why an identity is refused.

Ids are judged by the one rule of schemas/ids.py. One that breaks it is refused
before any Redis key is built from it (a ``}`` or ``{`` in an id could alias another
tenant's keys) and before the request is admitted (its event would be refused, so
the request could never be counted). The reason names the header (or field) and
the rule, never the value: an identity header may carry a secret sent by mistake,
and reasons travel into proxies' and clients' logs.
"""

from __future__ import annotations

from quotaflow.schemas.ids import ID_RULE, is_valid_id

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
