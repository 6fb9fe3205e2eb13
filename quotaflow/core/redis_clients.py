"""Redis clients from the settings: the one place that decides between a plain client and a
Redis Cluster client (QUOTAFLOW_REDIS_CLUSTER), for every stage and command.

A cluster client (redis-py's RedisCluster) is given any node of the cluster in
QUOTAFLOW_REDIS_URL and finds the others; it routes each command by its keys' hash slot, a
pipeline's commands to their nodes in parallel, and follows MOVED and a failover by itself.
Every script quotaflow runs touches the keys of one slot (one org's, by their hash tag), so
each call goes to one node as it is.

``fail_fast``: for callers with a time budget of their own (the gateways' checks). A cluster
client otherwise retries a command up to 10 times, sleeping between, when a node does not
answer; with ``fail_fast`` it raises at once, and the next command finds the cluster's new
shape (the client re-reads it after a connection error). A plain client is built exactly as
before either way.
"""

from __future__ import annotations

from typing import Any

import redis
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.backoff import NoBackoff
from redis.cluster import RedisCluster

from quotaflow.core.settings import Settings

AsyncClient = aioredis.Redis | AsyncRedisCluster
SyncClient = redis.Redis | RedisCluster


def async_client(settings: Settings, *, fail_fast: bool = False, **kwargs: Any) -> AsyncClient:
    """An asyncio client of QUOTAFLOW_REDIS_URL: a RedisCluster one in cluster mode."""
    if not settings.redis_cluster:
        return aioredis.Redis.from_url(settings.redis_url, **kwargs)
    if fail_fast:
        from redis.asyncio.retry import Retry

        kwargs["retry"] = Retry(NoBackoff(), 0)
    return AsyncRedisCluster.from_url(settings.redis_url, **kwargs)


def sync_client(settings: Settings, *, fail_fast: bool = False, **kwargs: Any) -> SyncClient:
    """A blocking client of QUOTAFLOW_REDIS_URL: a RedisCluster one in cluster mode."""
    if not settings.redis_cluster:
        return redis.Redis.from_url(settings.redis_url, **kwargs)
    if fail_fast:
        from redis.retry import Retry

        kwargs["retry"] = Retry(NoBackoff(), 0)
    return RedisCluster.from_url(settings.redis_url, **kwargs)


def is_cluster(client: object) -> bool:
    return isinstance(client, (AsyncRedisCluster, RedisCluster))
