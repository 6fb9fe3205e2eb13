"""The processors' Redis side, against the real Redis: the duplicate check."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis

from quotaflow.processors.backend import RedisBackend
from quotaflow.schemas.limits import policy_from_settings
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
