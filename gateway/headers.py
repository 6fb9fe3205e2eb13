"""Response headers for a Decision: the IETF RateLimit-Policy / RateLimit fields
(draft-ietf-httpapi-ratelimit-headers), the common X-RateLimit-* trio, and
Retry-After on a refusal."""

from __future__ import annotations

from quotaflow.schemas.redis_keys import Decision


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
