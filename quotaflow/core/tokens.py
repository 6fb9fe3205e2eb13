"""Bearer tokens of the HTTP APIs (QUOTAFLOW_API_TOKENS: token -> org id, or "*" for every
org): reading the header, and finding whose a token is without timing telling how much of
it matched."""

from __future__ import annotations

import hmac

from quotaflow.core.settings import TOKEN_MAX

ALL_ORGS = "*"  # an operator's token


def bearer(authorization: list[str]) -> str:
    """The token of the request's Authorization headers; ValueError naming what is wrong."""
    if not authorization:
        raise ValueError("missing Authorization header; send 'Authorization: Bearer <token>'")
    if len(authorization) > 1:
        raise ValueError("Authorization header given more than once")
    scheme, _, token = authorization[0].strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise ValueError("Authorization must be 'Bearer <token>'")
    if len(token) > TOKEN_MAX:
        raise ValueError(f"bearer token longer than {TOKEN_MAX} characters")
    return token


def owner(token: str, tokens: dict[str, str]) -> tuple[int, str] | None:
    """(the token's position in the configuration, from 1; its org id or ALL_ORGS), or None.
    Every configured token is compared, in constant time: the position names a token in
    logs and audits, never the token itself."""
    found = None
    for n, (known, org) in enumerate(tokens.items(), 1):
        if hmac.compare_digest(token.encode(), known.encode()) and token:
            found = (n, org)
    return found
