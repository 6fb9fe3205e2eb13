"""Response headers for a Decision: the IETF RateLimit-Policy / RateLimit fields
(draft-ietf-httpapi-ratelimit-headers), the common X-RateLimit-* trio, and
Retry-After on a refusal; and what a gateway answers for a Verdict: the identity it
verified (for the upstream), or the refusal with its status, code and reason."""

from __future__ import annotations

from quotaflow.gateway.limiter import (
    INSUFFICIENT_SCOPE,
    MISSING_KEY,
    RATE_LIMITED,
    UNAVAILABLE,
    Verdict,
)
from quotaflow.schemas.redis_keys import Decision

# The identity a check verified, for the upstream (nginx forwards them: deploy/nginx/quotaflow.conf).
ORG_ID_HEADER = "X-Quotaflow-Org-Id"
API_KEY_ID_HEADER = "X-Quotaflow-Api-Key-Id"
# On a refusal: the status the client should see (a proxy that may only answer 401 or 403
# to nginx's auth_request maps it back), the outcome as a code, and the reason in words.
STATUS_HEADER = "X-Quotaflow-Status"
CODE_HEADER = "X-Quotaflow-Code"
ERROR_HEADER = "X-Quotaflow-Error"


def _policy_name(window_name: str) -> str:
    return window_name.replace(":", "-")  # "key:60s" -> "key-60s", a plain sf-string


def rate_limit_headers(d: Decision) -> list[tuple[str, str]]:
    if not d.windows:  # nothing enforced, or Redis unreachable
        return [] if d.allowed else [("Retry-After", str(d.retry_after_s))]
    reset_s = max(0, -(-(d.reset_ms - d.now_ms) // 1000))
    headers = [
        ("RateLimit-Policy", ", ".join(f'"{_policy_name(w.name)}";q={w.limit};w={w.length_s}' for w in d.windows)),
        ("RateLimit", f'"{_policy_name(d.window)}";r={d.remaining};t={reset_s}'),
        ("X-RateLimit-Limit", str(d.limit)),
        ("X-RateLimit-Remaining", str(d.remaining)),
        ("X-RateLimit-Reset", str(-(-d.reset_ms // 1000))),  # epoch seconds, as most APIs send it
    ]
    if not d.allowed:
        headers.append(("Retry-After", str(d.retry_after_s)))
    return headers


def verdict_headers(v: Verdict) -> list[tuple[str, str]]:
    """The rate-limit headers when the check got to the limits, and for a key refused,
    WWW-Authenticate as RFC 6750 words it."""
    headers = rate_limit_headers(v.decision) if v.decision is not None else []
    if v.outcome == MISSING_KEY:
        headers.append(("WWW-Authenticate", "Bearer"))
    elif v.outcome == INSUFFICIENT_SCOPE:
        headers.append(("WWW-Authenticate", f'Bearer error="insufficient_scope", scope="{v.scope}"'))
    elif v.status == 401:
        headers.append(("WWW-Authenticate", 'Bearer error="invalid_token"'))
    return headers


def identity_headers(v: Verdict) -> list[tuple[str, str]]:
    """Who the request is from, once verified; none when nothing was (Redis down, failing open)."""
    if not v.org_id:
        return []
    return [(ORG_ID_HEADER, v.org_id), (API_KEY_ID_HEADER, v.api_key_id)]


def refusal_body(v: Verdict) -> dict:
    """The JSON a refused client gets: the outcome as a code, the reason in words (never
    the key), and for a rate limit the window and when to retry."""
    doc: dict = {"error": v.outcome, "reason": v.reason}
    if v.outcome in (RATE_LIMITED, UNAVAILABLE) and v.decision is not None:
        doc.update(window=v.decision.denied_by, retry_after_s=v.decision.retry_after_s)
    return doc
