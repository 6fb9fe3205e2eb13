"""``check(api_key_id, org_id) -> Decision``: one Redis round trip (check.lua).

When Redis is slower than the budget or down, the limiter fails open (admits,
``enforced=False``) or closed (refuses) as configured; it never blocks a
request longer than the budget.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from importlib import resources

import redis
import redis.asyncio as aioredis
from prometheus_client import Counter
from redis.exceptions import RedisError

from quotaflow.settings import Settings
from schemas.limits import Policy, policy_from_settings
from schemas.redis_keys import (
    ENFORCEMENT_KEY,
    Decision,
    WindowUsage,
    org_key,
    overrides_key,
    reservations_key,
    usage_key,
)

log = logging.getLogger(__name__)

CHECKS = Counter("quotaflow_gateway_checks_total", "Rate-limit checks by result", ["result"])
UNAVAILABLE = "unavailable"  # denied_by when Redis could not answer and the limiter fails closed

SCRIPT = resources.files("gateway").joinpath("check.lua").read_text()


class _Check:
    """Arguments and answer of check.lua, shared by the async and the sync limiter."""

    def __init__(self, policy: Policy, fail_open: bool):
        self.policy = policy
        self.fail_open = fail_open
        tail: list[str | int] = [policy.reservation_ttl_ms, policy.default_tier, len(policy.windows)]
        for w in policy.windows:
            tail += [w.label, w.length_ms, w.bucket_ms, int(w.sliding)]
        tail.append(len(policy.tiers))
        for name, limits in policy.tiers.items():
            tail += [name, *(-1 if limit is None else limit for limit in limits)]
        self.args_tail = tail

    @staticmethod
    def keys(api_key_id: str, org_id: str) -> list[str]:
        return [usage_key(org_id, api_key_id), usage_key(org_id), reservations_key(org_id, api_key_id),
                reservations_key(org_id), org_key(org_id), overrides_key(org_id, api_key_id), ENFORCEMENT_KEY]

    def args(self, event_id: str) -> list:
        return [event_id, *self.args_tail]

    @staticmethod
    def parse(reply: list, event_id: str) -> Decision:
        allowed, enforced, now_ms, tier = int(reply[0]), int(reply[1]), int(reply[2]), reply[3]
        tier = tier.decode() if isinstance(tier, bytes) else tier
        windows = []
        for i in range(4, len(reply), 6):
            scope, label = (x.decode() if isinstance(x, bytes) else x for x in reply[i:i + 2])
            windows.append(WindowUsage(scope, label, int(reply[i + 2]), int(reply[i + 3]), int(reply[i + 4]),
                                       int(reply[i + 5])))
        result = "allowed" if allowed else "denied"
        CHECKS.labels(result if enforced else "not_enforced").inc()
        return Decision.from_windows(tuple(windows), allowed=bool(allowed), tier=tier, now_ms=now_ms,
                                     event_id=event_id if enforced else "", enforced=bool(enforced))

    def unavailable(self, exc: BaseException) -> Decision:
        CHECKS.labels("redis_unavailable").inc()
        log.warning("rate-limit check failed", extra={"error": repr(exc), "fail_open": self.fail_open})
        now = int(time.time() * 1000)
        if self.fail_open:
            return Decision(allowed=True, tier="", limit=0, remaining=0, reset_ms=now, window="", denied_by="",
                            now_ms=now, enforced=False)
        return Decision(allowed=False, tier="", limit=0, remaining=0, reset_ms=now + 1000, window="",
                        denied_by=UNAVAILABLE, now_ms=now, enforced=False)


class RateLimiter:
    """For asyncio services and gateways."""

    def __init__(self, client: aioredis.Redis, policy: Policy, *, timeout_ms: int = 50, fail_open: bool = True):
        self._client = client
        self._script = client.register_script(SCRIPT)
        self._check = _Check(policy, fail_open)
        self.timeout_s = timeout_ms / 1000
        self.policy = policy

    @classmethod
    def from_settings(cls, settings: Settings) -> "RateLimiter":
        timeout_s = settings.gateway_timeout_ms / 1000
        client = aioredis.Redis.from_url(settings.redis_url, socket_timeout=timeout_s,
                                         socket_connect_timeout=timeout_s)
        return cls(client, policy_from_settings(settings), timeout_ms=settings.gateway_timeout_ms,
                   fail_open=settings.gateway_fail_open)

    async def check(self, api_key_id: str, org_id: str) -> Decision:
        event_id = str(uuid.uuid4())
        try:
            reply = await asyncio.wait_for(
                self._script(keys=_Check.keys(api_key_id, org_id), args=self._check.args(event_id)), self.timeout_s)
        except (RedisError, OSError, asyncio.TimeoutError) as exc:
            return self._check.unavailable(exc)
        return _Check.parse(reply, event_id)

    async def aclose(self) -> None:
        await self._client.aclose()


class SyncRateLimiter:
    """For threaded (WSGI) services: the same check, blocking for at most the budget."""

    def __init__(self, client: redis.Redis, policy: Policy, *, fail_open: bool = True):
        self._script = client.register_script(SCRIPT)
        self._check = _Check(policy, fail_open)
        self.policy = policy

    @classmethod
    def from_settings(cls, settings: Settings) -> "SyncRateLimiter":
        timeout_s = settings.gateway_timeout_ms / 1000
        client = redis.Redis.from_url(settings.redis_url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        return cls(client, policy_from_settings(settings), fail_open=settings.gateway_fail_open)

    def check(self, api_key_id: str, org_id: str) -> Decision:
        event_id = str(uuid.uuid4())
        try:
            reply = self._script(keys=_Check.keys(api_key_id, org_id), args=self._check.args(event_id))
        except (RedisError, OSError) as exc:
            return self._check.unavailable(exc)
        return _Check.parse(reply, event_id)
