"""Redis I/O of the processors: tiers and overrides in; counts, decisions and
reservation releases out, one atomic script call per batch.

Every call retries until Redis answers. The batch that needs it is not
acknowledged to Kafka before, so a Redis outage delays decisions (and stalls
the stream: backpressure) but never loses them.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from importlib import resources
from typing import Awaitable, Callable, Sequence, TypeVar

import orjson
from redis.exceptions import RedisError

from quotaflow.core.redis_clients import AsyncClient, evalsha_pipelined
from quotaflow.core.retry import retry
from quotaflow.processors import stopping
from quotaflow.processors.metrics import FENCED
from quotaflow.schemas.dedup import DuplicateCheck
from quotaflow.schemas.limits import Policy, parse_overrides
from quotaflow.schemas.redis_keys import (
    ORG_TIER_FIELD,
    Decision,
    applied_place,
    encode_buckets,
    org_key,
    overrides_key,
    reservations_key,
    seen_key,
    usage_key,
    window_field,
)

log = logging.getLogger(__name__)
T = TypeVar("T")


async def until_ok(op: Callable[[], Awaitable[T]], what: str) -> T:
    """op's answer, retried until Redis gives one (or the processor stops: stopping.Stopped)."""
    return await retry(op, f"redis: {what}", on=(RedisError, OSError), pause=stopping.pause, logger=log)


@dataclass
class SubjectWrite:
    """What one batch changes for one subject (a key, or an org when api_key_id is None)."""

    org_id: str
    api_key_id: str | None
    buckets: list | None = None  # per window, when the counts changed
    decision: Decision | None = None
    released: list[str] = field(default_factory=list)  # reservations whose events are now counted
    applied: tuple[int, int] | None = None  # (partition, position) of the last event the buckets include


WRITE_SCRIPT = resources.files("quotaflow.processors").joinpath("write.lua").read_text()
# On a Redis Cluster a batch's counts are acknowledged to Kafka once a replica of each master
# written to holds them too (WAIT), so a master's failover loses none of them; a replica
# slower than this (or down) is waited for no longer: the batch goes on, counted as
# unreplicated (core/redis_clients.py). Not sent to a single Redis.
REPLICA_WAIT_MS = 100


class RedisBackend:
    def __init__(self, redis: AsyncClient, policy: Policy, *, dedup_window_s: float = 600.0,
                 config_ttl_s: float = 5.0):
        self.redis = redis
        self.policy = policy
        self._duplicates = DuplicateCheck(redis, seen_key, dedup_window_s)
        self._write = redis.register_script(WRITE_SCRIPT)
        self._ttl_s = config_ttl_s
        self._tiers: dict[str, tuple[float, str]] = {}
        self._overrides: dict[tuple[str, str], tuple[float, dict[str, int]]] = {}
        # Usage expires once its longest window (and the grace after it) has passed.
        self.usage_ttl_ms = max(w.length_ms for w in policy.windows) * 2 + policy.late_grace_ms

    async def limits_config(self, keys: set[tuple[str, str]]) -> tuple[dict[str, str], dict[tuple[str, str], dict]]:
        """Tier of each org and overrides of each (org, key), cached for a few seconds so
        a change reaches decisions quickly without a Redis read per batch."""
        now = time.monotonic()
        orgs = {org for org, _ in keys}
        tiers = {o: hit[1] for o in orgs if (hit := self._tiers.get(o)) and hit[0] > now}
        overrides = {k: hit[1] for k in keys if (hit := self._overrides.get(k)) and hit[0] > now}
        missing_orgs = [o for o in orgs if o not in tiers]
        missing_keys = [k for k in keys if k not in overrides]
        if missing_orgs or missing_keys:
            async def read() -> list:
                pipe = self.redis.pipeline(transaction=False)
                for org in missing_orgs:
                    pipe.hget(org_key(org), ORG_TIER_FIELD)
                for org, key in missing_keys:
                    pipe.hgetall(overrides_key(org, key))
                return await pipe.execute()

            results = await until_ok(read, "read tiers and overrides")
            for org, raw in zip(missing_orgs, results[:len(missing_orgs)], strict=True):
                tiers[org] = self.policy.tier_of(raw)
                self._tiers[org] = (now + self._ttl_s, tiers[org])
            for k, raw in zip(missing_keys, results[len(missing_orgs):], strict=True):
                overrides[k] = parse_overrides(raw)
                self._overrides[k] = (now + self._ttl_s, overrides[k])
        return tiers, overrides

    async def duplicates(self, groups: list[tuple[str, int, Sequence[int], Sequence[str], Sequence[int]]]
                         ) -> list[bool]:
        """For groups of (org_id, partition, event times, event ids, positions): was each
        event already counted from another record? In the order of the events, one round
        trip for the batch (schemas/dedup.py)."""
        prepared = self._duplicates.prepare(groups)
        return await until_ok(lambda: self._duplicates.run(prepared), "check duplicates")

    def prepare_write(self, writes: list[SubjectWrite]) -> list[tuple[list[str], list]]:
        """The script calls of a batch's writes: one per org (write.lua), its arguments
        encoded now, whatever later batches do to the counts."""
        by_org: dict[str, list] = {}
        for w in writes:
            fields: list[str] = []
            if w.buckets is not None:
                for label, b in zip(self.policy.labels, w.buckets, strict=True):
                    fields += [window_field(label), encode_buckets(b)]
            if w.decision is not None:
                fields += w.decision.redis_fields()
            applied = "" if w.buckets is None or w.applied is None else applied_place(*w.applied)
            by_org.setdefault(w.org_id, []).append([usage_key(w.org_id, w.api_key_id),
                                                    reservations_key(w.org_id, w.api_key_id), fields, w.released,
                                                    applied])
        return [([usage_key(org)], [self.usage_ttl_ms, orjson.dumps(batch)]) for org, batch in by_org.items()]

    async def send_write(self, calls: list[tuple[list[str], list]]) -> int:
        """Prepared writes, in one round trip: the calls, each atomic like MULTI/EXEC and
        touching one org's keys only (one hash slot, as on a Redis Cluster), pipelined.
        Counts older than those stored (another processor of the group counted further)
        are not written (write.lua); returns how many were not."""
        if not calls:
            return 0
        replies = await until_ok(lambda: evalsha_pipelined(self.redis, WRITE_SCRIPT, self._write.sha, calls,
                                                           replicated_within_ms=REPLICA_WAIT_MS,
                                                           what="processor_counts"),
                                 "write counts and decisions")
        fenced = sum(replies)
        if fenced:
            FENCED.inc(fenced)
        return fenced
