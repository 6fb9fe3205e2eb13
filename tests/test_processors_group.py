"""Several processors in one consumer group on the events topic: a partition moving from one
to another (a processor killed, one joining) loses no count and counts nothing twice, and
gateways checking meanwhile admit no more than the limits.

The write fence is tested against the real Redis alone (seconds); the group under a stream,
with a SIGKILL and a join, takes a couple of minutes: marked `cluster` (make test-cluster).
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
import redis.asyncio as aioredis

from quotaflow.processors.backend import RedisBackend, SubjectWrite
from quotaflow.processors.counter import RequestCounter
from quotaflow.processors.offset_guard import next_offset_key
from quotaflow.processors.subjects import key_subject, org_subject
from quotaflow.schemas.limits import policy_from_settings
from quotaflow.schemas.redis_keys import APPLIED_FIELD, reservations_key, usage_key
from tests.pipeline import counted, this_minute, unique

pytestmark = pytest.mark.stack


def test_counts_older_than_those_stored_are_not_written_but_their_reservations_are_released(live_stack,
                                                                                             redis_client):
    """A processor that took a partition over recounts from the changelog's state, behind the
    counts its killed predecessor wrote; an owner that stalled past its session writes a
    batch its successor already counted further. Written, either moved the counts back
    while the reservations of the events since were gone: gateways would admit those
    events' worth again."""
    org, key = unique("fence"), unique("key")
    m = this_minute()
    policy = policy_from_settings(live_stack)
    ids = [unique("ev") for _ in range(6)]
    for scope in (reservations_key(org, key), reservations_key(org)):
        redis_client.zadd(scope, {i: m for i in ids})

    def buckets(n: int) -> list:
        return [[[m, n]]] + [[[m - m % w.bucket_ms, n]] for w in policy.windows[1:]]

    async def write(n: int, applied: tuple[int, int], released: list[str]) -> int:
        client = aioredis.Redis.from_url(live_stack.redis_url)
        try:
            backend = RedisBackend(client, policy)
            return await backend.write([SubjectWrite(org, key, buckets(n), None, released, applied),
                                        SubjectWrite(org, None, buckets(n), None, released, applied)])
        finally:
            await client.aclose()

    def state() -> tuple:
        return (counted(redis_client, org, key, m), counted(redis_client, org, None, m),
                redis_client.zcard(reservations_key(org, key)), redis_client.zcard(reservations_key(org)))

    assert asyncio.run(write(4, (3, 400 << 16), ids[:4])) == 0
    assert state() == (4, 4, 2, 2)
    # The same counts again (a batch written twice): written.
    assert asyncio.run(write(4, (3, 400 << 16), ids[:4])) == 0
    # Older counts from the same partition: not written; their events' reservations released.
    assert asyncio.run(write(2, (3, 200 << 16 | 5), ids[:2])) == 2
    assert state() == (4, 4, 2, 2)
    # Newer ones are.
    assert asyncio.run(write(6, (3, 401 << 16), ids)) == 0
    assert state() == (6, 6, 0, 0)
    # Places compare exactly beyond what a Lua number holds (2**53).
    assert asyncio.run(write(7, (3, 2**60), [])) == 0
    assert asyncio.run(write(1, (3, 2**60 - 1), [])) == 2
    assert state()[:2] == (7, 7)
    # Counts from another partition (the events topic's partitions were added to: the org
    # moved, its counts start over there) are written.
    assert asyncio.run(write(1, (0, 5), [])) == 0
    assert state()[:2] == (1, 1)
    assert redis_client.hget(usage_key(org, key), APPLIED_FIELD) == b"0:" + b"5".rjust(20, b"0")



def test_a_rebalance_forgets_what_was_counted_on_partitions_now_another_processors():
    """Kept, such state went stale while another processor counted on; the idle sweep then
    deleted from the changelog subjects their owner still counted (lost on its next recovery)."""
    state = {"p": 0, "o": 7, "m": 1, "b": [[]]}
    table = SimpleNamespace(data={key_subject("a", "k"): dict(state), org_subject("a"): dict(state),
                                  key_subject("b", "k"): {**state, "p": 2}, org_subject("b"): {**state, "p": 2},
                                  next_offset_key(0): 8, next_offset_key(2): 3, next_offset_key(11): 5})
    counter = RequestCounter(table, None, SimpleNamespace(policy=None), None, None, 12)
    counter.keep_partitions({2, 11})
    assert table.data == {key_subject("b", "k"): {**state, "p": 2}, org_subject("b"): {**state, "p": 2},
                          next_offset_key(2): 3, next_offset_key(11): 5}
