"""``check(api_key_id, org_id) -> Decision``: one Redis round trip (check.lua).

The round trip is a pipeline of two commands: GET of the emergency switch and
the check script. The switch is one key for every org, so it lives in no org's
hash slot; read inside the script it would make every call cross-slot (refused
by Redis Cluster, and then the check falls open). Read beside it, it is still
exact and read per check, and the script touches only keys of one org.

Ids are checked with the one rule (schemas/ids.py) before anything is sent:
an id holding ``}`` (which ends the hash tag) could otherwise alias another
tenant's keys.

When Redis is slower than the budget or down, the limiter fails open (admits,
``enforced=False``) or closed (refuses) as configured; it never blocks a
request longer than the budget.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
import uuid
from importlib import resources

import redis
import redis.asyncio as aioredis
from prometheus_client import Counter
from redis.exceptions import NoScriptError, RedisError

from quotaflow.core.settings import Settings
from quotaflow.schemas.ids import InvalidId, check_id
from quotaflow.schemas.limits import Policy, policy_from_settings
from quotaflow.schemas.redis_keys import (
    ENFORCEMENT_KEY,
    ENFORCEMENT_OFF,
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

SCRIPT = resources.files("quotaflow.gateway").joinpath("check.lua").read_text()
SCRIPT_SHA = hashlib.sha1(SCRIPT.encode()).hexdigest()
_OFF = (ENFORCEMENT_OFF, ENFORCEMENT_OFF.encode())  # as a client with or without decode_responses reads it


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
        """The script's keys: all of one org, so all in the org's hash slot. Refuses ids
        that break the rule (InvalidId naming the field) before any of them is built."""
        try:
            check_id("api_key_id", api_key_id)
            check_id("org_id", org_id)
        except InvalidId:
            CHECKS.labels("invalid_id").inc()
            raise
        return [usage_key(org_id, api_key_id), usage_key(org_id), reservations_key(org_id, api_key_id),
                reservations_key(org_id), org_key(org_id), overrides_key(org_id, api_key_id)]

    def args(self, event_id: str) -> list:
        return [event_id, *self.args_tail]

    @staticmethod
    def replies(switch: object, reply: object) -> tuple[object, list]:
        """The pipeline's two answers; the script's error is raised (the check is then
        unavailable), the switch's is read as 'not off'."""
        if isinstance(reply, BaseException):
            raise reply
        return (None if isinstance(switch, BaseException) else switch), reply  # type: ignore[return-value]

    @staticmethod
    def parse(switch: object, reply: list, event_id: str) -> Decision:
        """The decision from the switch's value and the script's answer. With the switch
        off every request is admitted: one the script admitted keeps its reservation
        (its event releases it, so counting goes on exactly), one it refused has none."""
        allowed, now_ms, tier = int(reply[0]), int(reply[1]), reply[2]
        tier = tier.decode() if isinstance(tier, bytes) else tier
        if switch in _OFF:  # anything else, a read error included, leaves enforcement on
            CHECKS.labels("not_enforced").inc()
            return Decision(allowed=True, tier=tier, limit=0, remaining=0, reset_ms=now_ms, window="", denied_by="",
                            now_ms=now_ms, event_id=event_id if allowed else "", enforced=False)
        windows = []
        for i in range(3, len(reply), 6):
            scope, label = (x.decode() if isinstance(x, bytes) else x for x in reply[i:i + 2])
            windows.append(WindowUsage(scope, label, int(reply[i + 2]), int(reply[i + 3]), int(reply[i + 4]),
                                       int(reply[i + 5])))
        CHECKS.labels("allowed" if allowed else "denied").inc()
        return Decision.from_windows(tuple(windows), allowed=bool(allowed), tier=tier, now_ms=now_ms,
                                     event_id=event_id)

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
        """The decision for one request; InvalidId (naming the field) for an id that
        breaks the rule, before anything is sent to Redis."""
        keys = _Check.keys(api_key_id, org_id)
        event_id = str(uuid.uuid4())
        try:
            switch, reply = await asyncio.wait_for(self._round_trip(keys, self._check.args(event_id)), self.timeout_s)
        except (RedisError, OSError, asyncio.TimeoutError) as exc:
            return self._check.unavailable(exc)
        return _Check.parse(switch, reply, event_id)

    async def _round_trip(self, keys: list[str], args: list) -> tuple[object, list]:
        """GET switch + EVALSHA, one pipeline (on a Redis Cluster, one request per node, sent
        together); a Redis that lost the script (restarted, flushed) gets it loaded (on
        every primary of a cluster) and the pair sent again."""
        switch, reply = await self._pipeline(keys, args)
        if isinstance(reply, NoScriptError):
            await self._client.script_load(SCRIPT)
            switch, reply = await self._pipeline(keys, args)
        return _Check.replies(switch, reply)

    async def _pipeline(self, keys: list[str], args: list) -> list:
        async with self._client.pipeline(transaction=False) as pipe:
            pipe.get(ENFORCEMENT_KEY)
            # execute_command, not pipe.evalsha: redis-py's cluster pipeline refuses the latter
            # (a script's keys might span nodes); ours are in one slot, routed by its keys
            pipe.execute_command("EVALSHA", SCRIPT_SHA, len(keys), *keys, *args)
            return await pipe.execute(raise_on_error=False)

    async def aclose(self) -> None:
        await self._client.aclose()


class SyncRateLimiter:
    """For threaded (WSGI) services: the same check, blocking for at most the budget."""

    def __init__(self, client: redis.Redis, policy: Policy, *, fail_open: bool = True):
        self._client = client
        self._check = _Check(policy, fail_open)
        self.policy = policy

    @classmethod
    def from_settings(cls, settings: Settings) -> "SyncRateLimiter":
        timeout_s = settings.gateway_timeout_ms / 1000
        client = redis.Redis.from_url(settings.redis_url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        return cls(client, policy_from_settings(settings), fail_open=settings.gateway_fail_open)

    def check(self, api_key_id: str, org_id: str) -> Decision:
        keys = _Check.keys(api_key_id, org_id)
        event_id = str(uuid.uuid4())
        try:
            switch, reply = self._round_trip(keys, self._check.args(event_id))
        except (RedisError, OSError) as exc:
            return self._check.unavailable(exc)
        return _Check.parse(switch, reply, event_id)

    def _round_trip(self, keys: list[str], args: list) -> tuple[object, list]:
        switch, reply = self._pipeline(keys, args)
        if isinstance(reply, NoScriptError):
            self._client.script_load(SCRIPT)
            switch, reply = self._pipeline(keys, args)
        return _Check.replies(switch, reply)

    def _pipeline(self, keys: list[str], args: list) -> list:
        with self._client.pipeline(transaction=False) as pipe:
            pipe.get(ENFORCEMENT_KEY)
            pipe.execute_command("EVALSHA", SCRIPT_SHA, len(keys), *keys, *args)  # as in RateLimiter._pipeline
            return pipe.execute(raise_on_error=False)
