"""The tier of each org as the sink stores it on every row: read from Redis (the org's
hash, redis_keys.org_key, field ``tier``, set by operators with ``quotaflow org set-tier``),
cached for a few seconds. (The tier names themselves: schemas/tiers.py.)

Events do not carry the tier, and a rollup must not change when an org changes tier
later, so the sink stamps each row with the tier it reads when storing it: within
the cache lifetime of the tier at request time (later only when the sink catches up
on a backlog). A tier is read as the processors read it (``tier_of`` of the limit
policy): an org without a tier, or with one the policy does not know, is on the
default tier, so usage per tier matches what was enforced. When Redis is unreachable the
last known tier is used, or '' (unknown) if there is none: storage does not wait for Redis.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

from prometheus_client import Counter
from redis.exceptions import RedisError

from quotaflow.core.redis_clients import async_from_url
from quotaflow.schemas.redis_keys import ORG_TIER_FIELD, org_key

log = logging.getLogger(__name__)
UNKNOWN = ""
CACHE_SECONDS = 5.0

LOOKUP_FAILURES = Counter("quotaflow_sink_tier_lookup_failures_total",
                          "Tier lookups in Redis that failed (the last known tier, or '', was stored)")


class TierCache:
    def __init__(self, redis_url: str, tier_of: Callable[[bytes | None], str], cache_seconds: float = CACHE_SECONDS,
                 cluster: bool = False):
        self._tier_of = tier_of
        self._redis = async_from_url(redis_url, cluster=cluster, socket_timeout=2.0, socket_connect_timeout=2.0)
        self._cache_seconds = cache_seconds
        self._tiers: dict[str, tuple[str, float]] = {}  # org -> (tier, read at, monotonic)
        self._retry_at = 0.0  # after a failure, Redis is left alone for a while: no timeout per batch

    async def close(self) -> None:
        await self._redis.aclose()

    async def tiers(self, org_ids: set[str]) -> dict[str, str]:
        """The tier of each org, reading from Redis those not read in the last few seconds."""
        now = time.monotonic()
        stale = sorted(o for o in org_ids if o not in self._tiers or now - self._tiers[o][1] > self._cache_seconds)
        if stale and now >= self._retry_at:
            try:
                pipe = self._redis.pipeline(transaction=False)
                for org in stale:
                    pipe.hget(org_key(org), ORG_TIER_FIELD)
                for org, raw in zip(stale, await pipe.execute(), strict=True):
                    self._tiers[org] = (self._tier_of(raw), now)
            except (RedisError, OSError) as exc:
                self._retry_at = now + self._cache_seconds
                LOOKUP_FAILURES.inc(len(stale))
                log.warning("tier lookup in redis failed; storing the last known tier",
                            extra={"error": str(exc), "orgs": len(stale)})
        return {o: self._tiers[o][0] if o in self._tiers else UNKNOWN for o in org_ids}
