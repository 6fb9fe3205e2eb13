"""Live limit state, read from Redis for the dashboard: per API key and per org, each
window's limit, what is used of it now and what remains, and the enforcement switch.

Read-only (SCAN, HMGET, HGETALL, ZCOUNT, GET; never a write), and the same arithmetic as
the gateways' check (gateway/check.lua): a window's use is the processors' durable
counts in it (schemas/limits.py window_count, as the processors read them) plus the
reservations of admitted requests not counted yet. A subject is
limited now when any of its windows is used up.

Redis has no index of an org's keys, so they are found with SCAN over the usage hashes
(``qf:v1:{org}:usage:*``), bounded in keys looked at, subjects read and time: an answer
cut short by a bound says so (``complete: false``) rather than pretend to be whole.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from quotaflow.schemas.limits import SUBJECT_KEY, SUBJECT_ORG, Policy, parse_overrides, window_count, window_reset
from quotaflow.schemas.redis_keys import (
    ENFORCEMENT_KEY,
    ENFORCEMENT_OFF,
    ORG_TIER_FIELD,
    PREFIX,
    decode_buckets,
    org_key,
    overrides_key,
    reservations_key,
    usage_key,
    usage_subject,
    window_field,
)

COLUMNS = ("org_id", "api_key_id", "subject", "tier", "window", "limit", "used", "remaining", "reset",
           "limited")
MAX_SCANNED = 200_000  # keys SCAN may look at for one answer
MAX_SUBJECTS = 2_000  # usage hashes read for one answer
MAX_SECONDS = 1.0  # time SCAN may take for one answer


@dataclass(frozen=True, slots=True)
class LiveState:
    now_ms: int
    enforcement: bool
    complete: bool
    rows: list[dict[str, Any]]

    @property
    def limited(self) -> list[tuple[str, str | None]]:
        """The subjects (org, key or None for the org itself) limited now."""
        return sorted({(r["org_id"], r["api_key_id"]) for r in self.rows if r["limited"]},
                      key=lambda s: (s[0], s[1] or ""))


class LiveLimits:
    """Reads the live state of one org, or of every org, from ``redis_url``."""

    def __init__(self, redis_url: str, policy: Policy, timeout_s: float = 2.0):
        self.policy = policy
        self._redis = aioredis.Redis.from_url(redis_url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)

    async def close(self) -> None:
        await self._redis.aclose()

    async def _subjects(self, org_id: str | None, api_key_id: str | None) -> tuple[list[tuple[str, str | None]], bool]:
        """(org, key or None) of the usage hashes that exist, and whether the search was whole."""
        if org_id is not None and api_key_id is not None:
            return [(org_id, api_key_id), (org_id, None)], True
        # Ids cannot hold glob characters (schemas/ids.py): they match as themselves.
        org_glob = org_id if org_id is not None else "*"
        pattern = PREFIX + "{" + org_glob + "}:usage:" + (f"key:{api_key_id}" if api_key_id else "*")
        found: set[tuple[str, str | None]] = set()
        cursor, scanned, deadline = 0, 0, time.monotonic() + MAX_SECONDS
        while True:
            cursor, keys = await self._redis.scan(cursor, match=pattern, count=1000)
            scanned += 1000
            for raw in keys:
                subject = usage_subject(raw.decode())
                if subject:
                    found.add(subject)
                    if api_key_id is not None:
                        found.add((subject[0], None))  # the key's org, beside it
            if cursor == 0:
                return sorted(found, key=lambda s: (s[0], s[1] or "")), True
            if len(found) >= MAX_SUBJECTS or scanned >= MAX_SCANNED or time.monotonic() > deadline:
                return sorted(found, key=lambda s: (s[0], s[1] or ""))[:MAX_SUBJECTS], False

    async def read(self, org_id: str | None = None, api_key_id: str | None = None,
                   now_ms: int | None = None) -> LiveState:
        """The state of ``org_id`` (None: every org), or of one key of it. Callers check
        the scope and the ids first (analytics/dashboard/__init__.py)."""
        now = int(time.time() * 1000) if now_ms is None else now_ms
        subjects, complete = await self._subjects(org_id, api_key_id)
        orgs = sorted({org for org, _ in subjects})
        windows = self.policy.windows
        fields = [window_field(w.label) for w in windows]
        pipe = self._redis.pipeline(transaction=False)
        pipe.get(ENFORCEMENT_KEY)
        for org in orgs:
            pipe.hget(org_key(org), ORG_TIER_FIELD)
        for org, key in subjects:
            pipe.hmget(usage_key(org, key), fields)
            if key is not None:
                pipe.hgetall(overrides_key(org, key))
            resv = reservations_key(org, key)
            for w in windows:
                # What check.lua adds to the counts: reservations since the window's start.
                pipe.zcount(resv, f"({now - w.length_ms}" if w.sliding else now - now % w.length_ms, "+inf")
        replies = iter(await pipe.execute())
        enforcement = next(replies) != ENFORCEMENT_OFF.encode()
        tiers = {org: self.policy.tier_of(next(replies)) for org in orgs}
        rows: list[dict[str, Any]] = []
        for org, key in subjects:
            texts = next(replies)
            overrides = parse_overrides(next(replies)) if key is not None else None
            reserved = [next(replies) for _ in windows]
            if not any(texts) and not any(reserved):
                continue  # expired between SCAN and now
            subject = SUBJECT_ORG if key is None else SUBJECT_KEY
            limits = self.policy.limits(subject, tiers[org], overrides)
            for w, text, resv, limit in zip(windows, texts, reserved, limits, strict=True):
                if limit is None or limit < 0:
                    continue  # unlimited in this window
                buckets = decode_buckets(text)
                used, reset = resv + window_count(buckets, w, now), window_reset(buckets, w, now)
                rows.append({"org_id": org, "api_key_id": key, "subject": subject, "tier": tiers[org],
                             "window": w.label, "limit": limit, "used": used,
                             "remaining": max(limit - used, 0), "reset_ms": reset, "limited": used >= limit})
        # Limited first, then the closest to their limit.
        rows.sort(key=lambda r: (not r["limited"], r["remaining"] / max(r["limit"], 1), r["org_id"],
                                 r["api_key_id"] or "", r["window"]))
        return LiveState(now, enforcement, complete, rows)
