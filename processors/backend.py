"""Redis I/O of the processors: org tiers in, decisions out.

Every call retries until Redis answers. The batch that needs it is not
acknowledged to Kafka before, so a Redis outage delays decisions (and stalls
the stream: backpressure) but never loses them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Awaitable, Callable, TypeVar

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from processors.limits import parse_tier
from schemas.redis_keys import ORG_TIER_FIELD, Decision, decision_key, org_key
from schemas.tiers import Tier

log = logging.getLogger(__name__)
T = TypeVar("T")


async def until_ok(op: Callable[[], Awaitable[T]], what: str, max_delay_s: float = 5.0) -> T:
    delay = 0.1
    while True:
        try:
            return await op()
        except (RedisError, OSError) as exc:
            log.warning("redis unavailable, retrying", extra={"op": what, "error": str(exc), "retry_in_s": delay})
            await asyncio.sleep(delay)
            delay = min(delay * 2, max_delay_s)


class RedisBackend:
    def __init__(self, redis: aioredis.Redis, tier_ttl_s: float = 5.0):
        self.redis = redis
        self._tier_ttl_s = tier_ttl_s
        self._tiers: dict[str, tuple[float, Tier]] = {}

    async def org_tiers(self, org_ids: set[str]) -> dict[str, Tier]:
        """Tier of each org, cached for a few seconds so a tier change reaches
        decisions quickly without a Redis read per batch."""
        now = time.monotonic()
        found = {o: hit[1] for o in org_ids if (hit := self._tiers.get(o)) and hit[0] > now}
        missing = [o for o in org_ids if o not in found]
        if missing:
            async def read() -> list:
                pipe = self.redis.pipeline(transaction=False)
                for org in missing:
                    pipe.hget(org_key(org), ORG_TIER_FIELD)
                return await pipe.execute()

            for org, raw in zip(missing, await until_ok(read, "read org tiers"), strict=True):
                tier = parse_tier(raw)
                self._tiers[org] = (now + self._tier_ttl_s, tier)
                found[org] = tier
        return found

    async def write_decisions(self, decisions: list[Decision]) -> None:
        """All decisions of a batch in one round trip."""
        async def write() -> None:
            pipe = self.redis.pipeline(transaction=False)
            for d in decisions:
                key = decision_key(d.api_key_id)
                pipe.hset(key, mapping=d.to_redis())
                # Keep a decision one window past its reset, then let Redis drop it.
                pipe.pexpireat(key, d.reset_ms + d.window_s * 1000)
            await pipe.execute()

        if decisions:
            await until_ok(write, "write decisions")
