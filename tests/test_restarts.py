"""Restarts mid-stream: Redis, the Kafka broker, and the processor killed with SIGKILL.
At-least-once delivery with an idempotent effect: nothing lost, nothing counted twice."""

from __future__ import annotations

import asyncio
import re
import threading
import time

import pytest

from quotaflow.collector.emitter import Emitter
from quotaflow.deploy import kafka
from quotaflow.deploy import redis as redis_service
from quotaflow.schemas.redis_keys import ORG_TIER_FIELD, org_key
from tests.pipeline import counted, decision, event, minute_start, publish, this_minute, unique, wait_for

REDIS_RETRYING = re.compile(r"redis: [\w ]+ failed, retrying")  # the processor's log line (core/retry.py)

pytestmark = pytest.mark.stack
COUNTED = 'quotaflow_processor_events_total{outcome="counted"}'
REDELIVERED = 'quotaflow_processor_events_total{outcome="redelivered"}'


def test_redis_outage_delays_decisions_but_loses_none(live_stack, redis_client, pipeline):
    org, key = unique("org"), unique("key")
    redis_client.hset(org_key(org), ORG_TIER_FIELD, "SCALE")
    pipeline.start("processor")
    window = minute_start()
    asyncio.run(publish(live_stack, [event(org, key, window + i) for i in range(50)]))
    wait_for(lambda: counted(redis_client, org, key, window) == 50, 60, "first counts", pipeline.logs)

    redis_service.stop(live_stack)
    asyncio.run(publish(live_stack, [event(org, key, window + 100 + i) for i in range(70)]))
    wait_for(lambda: REDIS_RETRYING.search(pipeline.logs("processor")), 30, "the processor to notice")
    redis_service.start(live_stack)

    wait_for(lambda: counted(redis_client, org, key, window) == 120, 60, "counts after Redis came back", pipeline.logs)
    d = decision(redis_client, org, key)
    assert (d.limit, d.remaining, d.allowed) == (200, 80, True)


def test_broker_restart_mid_stream_loses_nothing(live_stack, redis_client, pipeline):
    org, key = unique("org"), unique("key")
    redis_client.hset(org_key(org), ORG_TIER_FIELD, "ENTERPRISE")
    window = this_minute()
    events = [event(org, key, window + i) for i in range(400)]
    pipeline.start("processor")
    pipeline.start("sink")

    async def send_across_a_restart() -> int:
        async with Emitter(live_stack.kafka_bootstrap) as emitter:
            for ev in events[:200]:
                await emitter.emit(ev)
            await emitter.flush()
            await asyncio.to_thread(kafka.stop, live_stack)
            for ev in events[200:]:  # buffered by the producer while the broker is down
                await emitter.emit(ev)
            await asyncio.to_thread(kafka.start, live_stack)
            await emitter.flush()
            return emitter.failed

    assert asyncio.run(send_across_a_restart()) == 0
    wait_for(lambda: counted(redis_client, org, key, window) == 400, 120, "all 400 counted once", pipeline.logs)
    pipeline.wait_caught_up(120)
    pipeline.stop("sink")
    rows = pipeline.query_clickhouse("SELECT uniqExact(event_id), count() FROM requests WHERE org_id = {o:String}",
                                     {"o": org})
    assert rows[0][0] == 400  # every event stored


def test_processor_killed_while_reading_ahead_counts_each_event_once(live_stack, redis_client, pipeline):
    """A backlog of one-event records in batches of 100: every batch is full, so while one
    waits for its duplicate check the next is read, and the one before is finishing
    (consumer.py). A SIGKILL among them, then a restart: each event counted once."""
    org, key = unique("org"), unique("key")
    window = this_minute()
    total = 3000
    asyncio.run(publish(live_stack, [event(org, key, window + i) for i in range(total)], batch_events=1))
    pipeline.start("processor", QUOTAFLOW_PROCESSOR_COMMIT_INTERVAL_S="600", QUOTAFLOW_PROCESSOR_BATCH_EVENTS="100")
    wait_for(lambda: pipeline.metric("processor", COUNTED) >= 1000, 60, "the processor to be mid-backlog", pipeline.logs)
    pipeline.kill("processor")
    pipeline.start("processor")  # by its supervisor, with the same variables
    wait_for(lambda: counted(redis_client, org, key, window) == total, 120, f"exactly {total} counted",
             lambda: f"count={counted(redis_client, org, key, window)}\n{pipeline.logs()}")
    assert pipeline.metric("processor", REDELIVERED) > 0  # read again after the kill, and recognised
    pipeline.wait_processor_applied(redis_client)
    assert counted(redis_client, org, key, window) == total
    assert counted(redis_client, org, None, window) == total


def test_processor_killed_mid_stream_counts_each_event_once(live_stack, redis_client, pipeline):
    org, key = unique("org"), unique("key")
    window = this_minute()
    total, chunk = 6000, 200
    events = [event(org, key, window + (i % 50_000)) for i in range(total)]
    # No commit before the kill: whatever this processor counted is read again after it.
    pipeline.start("processor", QUOTAFLOW_PROCESSOR_COMMIT_INTERVAL_S="600")

    def publish_slowly() -> None:
        for i in range(0, total, chunk):
            asyncio.run(publish(live_stack, events[i:i + chunk]))
            time.sleep(0.05)

    publisher = threading.Thread(target=publish_slowly)
    publisher.start()
    wait_for(lambda: pipeline.metric("processor", COUNTED) >= 1500, 60, "the processor to be mid-stream", pipeline.logs)
    pipeline.kill("processor")
    pipeline.start("processor")
    publisher.join()

    wait_for(lambda: counted(redis_client, org, key, window) == total, 120, f"exactly {total} counted",
             lambda: f"count={counted(redis_client, org, key, window)} counted={pipeline.metric('processor', COUNTED)} "
                     f"redelivered={pipeline.metric('processor', REDELIVERED)} "
                     f"ready={pipeline.metric('processor', 'quotaflow_processor_ready')}\n{pipeline.logs()}")
    # The restarted processor did see records again (their offsets were not committed
    # when it died) and skipped them rather than count them twice.
    assert pipeline.metric("processor", REDELIVERED) > 0
    pipeline.wait_processor_applied(redis_client)  # nothing published is left to push the count past the total
    assert counted(redis_client, org, key, window) == total
    assert counted(redis_client, org, None, window) == total
