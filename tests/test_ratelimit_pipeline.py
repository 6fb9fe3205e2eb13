"""Rate limiting end to end: gateways reserving, processors counting and reconciling,
duplicates and late events, on the real Kafka and Redis."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time

import pytest

from quotaflow.schemas.redis_keys import ORG_TIER_FIELD, org_key, reservations_key
from tests.pipeline import counted, decision, event, minute_start, publish, this_minute, unique, wait_for

pytestmark = pytest.mark.stack


def test_concurrent_gateways_admit_exactly_the_limit_and_processors_take_over(live_stack, redis_client, pipeline):
    """Four gateway processes at 4x a STARTER key's 30/min: exactly 30 admitted in all.
    Once the processor has counted their events, the counts hold what the
    reservations held: reservations released, refusals (429) not counted."""
    org, key = unique("org"), unique("key")
    redis_client.hset(org_key(org), ORG_TIER_FIELD, "STARTER")
    pipeline.start("processor")
    window_ms = minute_start(need_s=25)  # the burst must not straddle a minute boundary
    env = {**os.environ, "QUOTAFLOW_GATEWAY_TIMEOUT_MS": "5000"}
    workers = [subprocess.Popen([sys.executable, "-m", "tests.gateway_worker", org, key, "30"], env=env,
                                stdout=subprocess.PIPE, text=True) for _ in range(4)]
    outputs = [w.communicate(timeout=120)[0].strip() for w in workers]
    assert all(w.returncode == 0 for w in workers), outputs
    admitted = sum(int(o.split()[0].split("=")[1]) for o in outputs)
    assert all(o.endswith("enforced=True") for o in outputs), outputs
    assert admitted == 30

    wait_for(lambda: counted(redis_client, org, key, window_ms) == 30, 60, "the processor to count the 30",
             pipeline.logs)
    wait_for(lambda: redis_client.zcard(reservations_key(org, key)) == 0, 30, "reservations to be released")
    assert redis_client.zcard(reservations_key(org)) == 0
    assert counted(redis_client, org, None, window_ms) == 30  # the 90 refusals are not counted
    d = decision(redis_client, org, key)
    assert (d.allowed, d.denied_by, d.limit) == (False, "key:60s", 30)


def test_an_event_published_twice_is_counted_once(live_stack, redis_client, pipeline):
    org, key = unique("org"), unique("key")
    window = this_minute()
    events = [event(org, key, window + i) for i in range(20)]
    pipeline.start("processor")
    asyncio.run(publish(live_stack, events))
    asyncio.run(publish(live_stack, events[:5]))  # a publisher retrying: five records again
    # Everything published so far applied (markers after it counted), then the counts read:
    # the processor's counters are its own since it started and may include records other
    # tests left on the topic, so they only show that duplicates were recognised.
    pipeline.wait_processor_applied(redis_client)
    assert pipeline.metric("processor", 'quotaflow_processor_events_total{outcome="duplicate"}') >= 5
    assert counted(redis_client, org, key, window) == 20
    assert counted(redis_client, org, None, window) == 20


def test_late_events_count_only_in_the_windows_still_open(live_stack, redis_client, pipeline):
    """The key's clock is at H+10m (H: the start of the last hour, so that every time is
    past: an event cannot move a clock past its record's arrival). An event of H+9m30s
    is within the 60 s grace of its minute; one of H+5m is late for its minute (closed
    4 min earlier) but counts in the hour and the day."""
    org, key = unique("org"), unique("key")
    now = int(time.time() * 1000)
    hour = now - now % 3_600_000 - 3_600_000
    clock, on_time, late = hour + 600_000, hour + 570_000, hour + 300_000
    pipeline.start("processor")
    asyncio.run(publish(live_stack, [event(org, key, clock)]))
    wait_for(lambda: counted(redis_client, org, key, clock) == 1, 60, "the first event", pipeline.logs)
    asyncio.run(publish(live_stack, [event(org, key, on_time), event(org, key, late)]))
    wait_for(lambda: counted(redis_client, org, key, clock, "3600s") == 3, 60, "the late events", pipeline.logs)
    assert counted(redis_client, org, key, clock, "86400s") == 3
    assert counted(redis_client, org, key, on_time) == 1  # counted in its (closed, within grace) minute
    assert counted(redis_client, org, key, late) == 0  # too late for its minute
    assert pipeline.metric("processor", 'quotaflow_processor_events_total{outcome="late"}') >= 1


def test_batch_records_count_every_event_and_dead_letter_only_the_bad_one(live_stack, redis_client, pipeline):
    import orjson

    from quotaflow.collector.emitter import Emitter
    from quotaflow.schemas import deadletter
    from quotaflow.schemas.topics import DEAD_LETTER_TOPIC
    from tests.pipeline import read_all

    org, keys = unique("org"), [unique("key") for _ in range(3)]
    pipeline.start("processor")
    window = this_minute()
    events = [event(org, keys[i % 3], window + i) for i in range(300)]
    bad = {**events[7].to_dict(), "event_id": "0e4a1d3c-0000-4000-8000-0000000000aa", "endpoint": "/v1/things/12345"}

    async def send() -> None:
        async with Emitter(live_stack.kafka_bootstrap, batch_events=120) as emitter:
            for ev in events:
                await emitter.emit(ev)
            # a publisher's own batch: one bad event, one good one
            good = {**events[1].to_dict(), "event_id": "0e4a1d3c-0000-4000-8000-0000000000bb"}
            await emitter.emit_bytes(org.encode(), orjson.dumps([bad, good]))

    asyncio.run(send())
    wait_for(lambda: sum(counted(redis_client, org, k, window) or 0 for k in keys) == 301, 60,
             "every event of the batches counted", pipeline.logs)
    assert [counted(redis_client, org, k, window) for k in keys] == [100 + (k == 1) for k in range(3)]
    dead = [r for r in asyncio.run(read_all(live_stack, DEAD_LETTER_TOPIC)) if r.key == org.encode()]
    assert len(dead) == 1
    headers = deadletter.read_headers(dead[0].headers)
    assert headers[deadletter.HEADER_SOURCE_INDEX] == "0" and "looks like a raw id" in headers[deadletter.HEADER_REASON]
    assert orjson.loads(dead[0].value)["event_id"] == bad["event_id"]  # the refused event alone
