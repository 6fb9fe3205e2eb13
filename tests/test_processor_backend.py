"""The processors' Redis side, against the real Redis: the duplicate check, and the
decisions a batch writes, taken at the counter's clock."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
import redis.asyncio as aioredis

from quotaflow.processors.backend import RedisBackend
from quotaflow.processors.counter import RequestCounter
from quotaflow.processors.subjects import key_subject, org_subject
from quotaflow.processors.window_counts import apply_events
from quotaflow.schemas.limits import SUBJECT_KEY, policy_from_settings
from quotaflow.schemas.redis_keys import seen_key
from tests.pipeline import minute_start, unique

pytestmark = pytest.mark.stack


def test_an_event_is_a_duplicate_only_when_another_record_carried_it(live_stack, redis_client):
    org, m = unique("org"), minute_start()
    ids = [unique("ev") for _ in range(6)]

    async def check(*groups):
        client = aioredis.Redis.from_url(live_stack.redis_url)
        try:
            backend = RedisBackend(client, policy_from_settings(live_stack), dedup_window_s=60)
            return await backend.duplicates(list(groups))
        finally:
            await client.aclose()

    def run(*groups):
        return asyncio.run(check(*groups))

    first = (org, 0, [m + 1, m + 2, m + 3], ids[:3], [100, 101, 102])
    assert run(first) == [False, False, False]
    assert run(first) == [False, False, False]  # the same record again: a redelivery, not a copy
    assert run((org, 0, [m + 1, m + 9], [ids[0], ids[3]], [200, 201])) == [True, False]  # a copy in a later record
    assert run((org, 1, [m + 2], [ids[1]], [7])) == [True]  # a copy in another partition
    # Two copies in one call: the second is the duplicate.
    assert run((org, 0, [m + 4], [ids[4]], [300]), (org, 0, [m + 4], [ids[4]], [301])) == [False, True]
    # Events across a minute boundary are checked in two hashes, answered in event order.
    assert run((org, 0, [m + 59_999, m + 60_000, m + 5], [ids[5], unique("ev"), ids[2]], [400, 401, 402])) == \
        [False, False, True]
    assert run((org, 0, [m + 60_000, m + 59_999], [unique("ev"), ids[5]], [500, 501])) == [False, True]
    # Each hash expires the dedup window after its last write.
    assert 0 < redis_client.pttl(seen_key(org, m)) <= 60_000
    assert redis_client.hlen(seen_key(org, m)) == 6 and redis_client.hlen(seen_key(org, m + 60_000)) == 2


def test_decisions_are_taken_at_the_time_of_the_counters_clock(live_stack):
    """The same counts decide differently at different times: within their minute the key
    is at its limit and denied; a minute later the 60 s window is free again. The clock
    is the counter's own, so the test says when "now" is."""
    org, key = unique("org"), unique("key")
    policy = policy_from_settings(live_stack)
    limit = policy.limits(SUBJECT_KEY, policy.default_tier)[0]  # of the 60 s window; no tier set: the default
    minute = 1_700_000_040_000  # a minute start (epoch ms), long past: only the clock makes it "now"
    times = [minute + 1_000 + i for i in range(limit)]
    table = SimpleNamespace(data={})
    for subject in (key_subject(org, key), org_subject(org)):
        _, table.data[subject] = apply_events(None, times, 0, list(range(len(times))), policy)

    async def decide_at(now_s: float):
        client = aioredis.Redis.from_url(live_stack.redis_url)
        try:
            counter = RequestCounter(table, None, RedisBackend(client, policy), None, None, 1, clock=lambda: now_s)
            return await counter.writes({(org, key): 0}, {(org, key): ["e1"]})
        finally:
            await client.aclose()

    within = asyncio.run(decide_at((minute + 30_000) / 1000))
    assert [(w.org_id, w.api_key_id) for w in within] == [(org, key), (org, None)]
    assert within[0].released == within[1].released == ["e1"]
    d = within[0].decision
    assert (d.allowed, d.now_ms, d.window, d.remaining, d.reset_ms) == (False, minute + 30_000, "key:60s", 0,
                                                                        minute + 60_000)
    later = asyncio.run(decide_at((minute + 90_000) / 1000))[0].decision
    assert later.allowed and later.now_ms == minute + 90_000
    assert [w.used for w in later.windows if w.name == "key:60s"] == [0]
