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

import logging
from typing import Any

import redis
import redis.asyncio as aioredis
from prometheus_client import Counter
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.backoff import NoBackoff
from redis.cluster import RedisCluster
from redis.exceptions import NoScriptError

from quotaflow.core.settings import Settings

log = logging.getLogger(__name__)
UNREPLICATED = Counter("quotaflow_redis_unreplicated_calls_total",
                       "Script calls on a Redis Cluster master whose replica had not acknowledged them within the "
                       "wait (they are lost if the master dies before it does)", ["what"])

AsyncClient = aioredis.Redis | AsyncRedisCluster
SyncClient = redis.Redis | RedisCluster


def async_client(settings: Settings, **kwargs: Any) -> AsyncClient:
    """An asyncio client of QUOTAFLOW_REDIS_URL: a RedisCluster one in cluster mode."""
    return async_from_url(settings.redis_url, cluster=settings.redis_cluster, nodes=settings.redis_cluster_nodes,
                          **kwargs)


def sync_client(settings: Settings, **kwargs: Any) -> SyncClient:
    """A blocking client of QUOTAFLOW_REDIS_URL: a RedisCluster one in cluster mode."""
    return sync_from_url(settings.redis_url, cluster=settings.redis_cluster, nodes=settings.redis_cluster_nodes,
                         **kwargs)


def async_from_url(url: str, *, cluster: bool = False, nodes: str | None = None, fail_fast: bool = False,
                   **kwargs: Any) -> AsyncClient:
    """``nodes``: host:port,... of more nodes to start from (QUOTAFLOW_REDIS_CLUSTER_NODES)."""
    if not cluster:
        return aioredis.Redis.from_url(url, **kwargs)
    from redis.asyncio.cluster import ClusterNode
    from redis.asyncio.retry import Retry

    if fail_fast:
        kwargs["retry"] = Retry(NoBackoff(), 0)
    return AsyncRedisCluster.from_url(url, startup_nodes=[ClusterNode(h, p) for h, p in _nodes(nodes)], **kwargs)


def sync_from_url(url: str, *, cluster: bool = False, nodes: str | None = None, fail_fast: bool = False,
                  **kwargs: Any) -> SyncClient:
    if not cluster:
        return redis.Redis.from_url(url, **kwargs)
    from redis.cluster import ClusterNode
    from redis.retry import Retry

    if fail_fast:
        kwargs["retry"] = Retry(NoBackoff(), 0)
    return RedisCluster.from_url(url, startup_nodes=[ClusterNode(h, p) for h, p in _nodes(nodes)], **kwargs)


def _nodes(nodes: str | None) -> list[tuple[str, int]]:
    """The URL's node is one to start from; a cluster client that knows no other cannot
    start (or find the cluster's new shape) while that node is down."""
    if not nodes:
        return []
    return [(host, int(port)) for host, port in (item.strip().rsplit(":", 1) for item in nodes.split(","))]


def is_cluster(client: object) -> bool:
    return isinstance(client, (AsyncRedisCluster, RedisCluster))


async def evalsha_pipelined(client: AsyncClient, script: str, sha: str, calls: list[tuple[list, list]], *,
                            replicated_within_ms: int | None = None, what: str = "") -> list:
    """One script's calls, ``(keys, args)`` each, pipelined in one round trip (on a cluster,
    to each call's node in parallel: a call's keys must share a slot), their answers in
    order. A Redis lacking the script (restarted, flushed, a replica just promoted) gets it
    loaded and the calls sent again, so the script must give the same answers when run
    twice; any other error is raised. EVALSHA as a plain command: redis-py's cluster
    pipeline refuses its evalsha (and so Script objects), not knowing the keys share a slot.

    ``replicated_within_ms`` (cluster only): each master written to that has a replica is
    sent WAIT 1 on the same connection after the calls, so the answer comes once a replica
    holds them too (what a failover promotes), or after that many ms: then it goes on, and
    counts the calls in quotaflow_redis_unreplicated_calls_total{what} (a replica that is
    down, or slow; stopping would stall the caller for as long as the replica is away)."""
    wait = replicated_within_ms is not None and is_cluster(client)
    if wait:
        await client.initialize()  # the slots' nodes known (a no-op once they are)
    for attempt in range(2):
        pipe = client.pipeline(transaction=False)
        for keys, args in calls:
            pipe.execute_command("EVALSHA", sha, len(keys), *keys, *args)
        waited: dict[str, int] = {}  # node -> calls sent to it
        if wait:
            for keys, _ in calls:
                if client.get_node_from_key(keys[0], replica=True) is not None:
                    node = client.get_node_from_key(keys[0])
                    waited[node.name] = waited.get(node.name, 0) + 1
            for name in waited:
                pipe.execute_command("WAIT", 1, replicated_within_ms, target_nodes=client.get_node(node_name=name))
        replies = await pipe.execute(raise_on_error=False)
        replies, acks = replies[:len(calls)], replies[len(calls):]
        errors = [r for r in replies if isinstance(r, Exception)]
        if not errors:
            for (name, n), ack in zip(waited.items(), acks, strict=True):
                if isinstance(ack, Exception) or int(ack) < 1:
                    UNREPLICATED.labels(what).inc(n)
                    log.warning("a Redis Cluster master's replica did not acknowledge writes in time",
                                extra={"node": name, "calls": n, "within_ms": replicated_within_ms, "what": what})
            return replies
        if attempt or not all(isinstance(e, NoScriptError) for e in errors):
            raise errors[0]
        await client.script_load(script)
    raise AssertionError("unreachable")
