"""The producer core's disk spool against the real broker: Kafka unreachable, the
emitter restarted over what its predecessor spooled, and the broker stopped for 30 s
under load with every event arriving in Redis and ClickHouse exactly once."""

from __future__ import annotations

import asyncio
import os
import time

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from quotaflow.collector import producer
from quotaflow.collector.emitter import Emitter
from quotaflow.collector.spool import CORRUPT
from quotaflow.deploy import kafka
from quotaflow.schemas.redis_keys import ORG_TIER_FIELD, org_key
from quotaflow.schemas.topics import EVENTS_TOPIC
from tests.pipeline import counted, event, this_minute, unique, wait_for

pytestmark = pytest.mark.stack


async def event_ids_on_kafka(settings, org: str) -> list[str]:
    """The event ids of every record keyed by ``org`` on the events topic, copies included."""
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, enable_auto_commit=False,
                                auto_offset_reset="earliest")
    await consumer.start()
    try:
        parts = [TopicPartition(EVENTS_TOPIC, p) for p in range(settings.events_partitions)]
        consumer.assign(parts)
        await consumer.seek_to_beginning(*parts)
        ends = await consumer.end_offsets(parts)
        ids = []

        async def behind() -> bool:
            return any([await consumer.position(tp) < ends[tp] for tp in parts])

        while await behind():
            for records in (await consumer.getmany(timeout_ms=1000)).values():
                for r in records:
                    if r.key == org.encode():
                        doc = orjson.loads(r.value)
                        ids += [e["event_id"] for e in (doc if isinstance(doc, list) else [doc])]
        return ids
    finally:
        await consumer.stop()


def test_unreachable_kafka_spools_and_the_next_emitter_replays_it(live_stack, tmp_path, port_base):
    org = unique("org")
    events = [event(org, "k1", this_minute() + i) for i in range(300)]
    spool = tmp_path / "spool"

    async def while_kafka_is_unreachable() -> tuple[int, int, int]:
        # Nothing listens there: start does not fail, emit does not wait, stop leaves it on disk.
        emitter = Emitter(f"127.0.0.1:{port_base + 398}", spool_dir=spool, batch_events=50,
                          delivery_timeout_s=1, stop_timeout_s=1)
        await emitter.start()
        started = time.monotonic()
        for ev in events:
            assert await emitter.emit(ev)
        assert time.monotonic() - started < 1.0
        await emitter.stop()
        return emitter.spooled, emitter.delivered, emitter.failed

    assert asyncio.run(while_kafka_is_unreachable()) == (300, 0, 0)
    assert list(spool.glob("*.qfspool"))

    async def restarted() -> tuple[int, int]:
        async with Emitter(live_stack.kafka_bootstrap, spool_dir=spool) as emitter:
            await emitter.flush()
            return emitter.delivered, emitter.failed

    assert asyncio.run(restarted()) == (300, 0)
    assert list(spool.glob("*.qfspool")) == []  # every segment deleted once acknowledged
    ids = asyncio.run(event_ids_on_kafka(live_stack, org))
    assert sorted(ids) == sorted(ev.event_id for ev in events)


def test_a_torn_spool_is_replayed_but_for_the_torn_record(live_stack, tmp_path, port_base):
    org = unique("org")
    events = [event(org, "k1", this_minute() + i) for i in range(300)]
    spool = tmp_path / "spool"

    async def spool_all() -> None:
        emitter = Emitter(f"127.0.0.1:{port_base + 398}", spool_dir=spool, batch_events=50, stop_timeout_s=0)
        await emitter.start()
        for ev in events:
            await emitter.emit(ev)
        await emitter.stop()
        assert emitter.spooled == 300

    asyncio.run(spool_all())
    [segment] = spool.glob("*.qfspool")
    os.truncate(segment, segment.stat().st_size - 100)  # killed while writing its last record (50 events)
    torn_before = CORRUPT.labels("torn_tail")._value.get()

    async def restarted() -> tuple[int, int]:
        async with Emitter(live_stack.kafka_bootstrap, spool_dir=spool) as emitter:
            await emitter.flush()
            return emitter.delivered, emitter.failed

    assert asyncio.run(restarted()) == (250, 0)
    assert CORRUPT.labels("torn_tail")._value.get() == torn_before + 1
    ids = asyncio.run(event_ids_on_kafka(live_stack, org))
    assert sorted(ids) == sorted(ev.event_id for ev in events[:250])


def test_outcome_per_record(live_stack, tmp_path):
    async def run() -> list[str]:
        core = producer.ProducerCore(live_stack.kafka_bootstrap, spool_dir=tmp_path / "spool")
        await core.start()
        org = unique("org")
        futures = [core.submit(producer.Record(EVENTS_TOPIC, org.encode(), event(org, "k", this_minute()).encode()),
                               want_outcome=True) for _ in range(3)]
        too_big = core.submit(producer.Record(EVENTS_TOPIC, b"x", b"x" * (3 * 1024 * 1024)), want_outcome=True)
        await core.flush()
        await core.stop()
        return [f.result() for f in futures] + [too_big.result(), core.delivered, core.lost]

    assert asyncio.run(run()) == [producer.DELIVERED] * 3 + [producer.LOST, 3, 1]


def test_broker_stopped_30s_under_load_every_event_arrives_once(live_stack, redis_client, pipeline, tmp_path):
    org, key = unique("org"), unique("key")
    redis_client.hset(org_key(org), ORG_TIER_FIELD, "ENTERPRISE")
    window = this_minute()
    pipeline.start("processor")
    pipeline.start("sink")
    sent: list[str] = []
    slowest_emit = [0.0]

    async def load(emitter: Emitter, stop: asyncio.Event) -> None:
        i = 0
        while not stop.is_set():
            for _ in range(20):
                ev = event(org, key, window + i % 60_000)
                i += 1
                started = time.monotonic()
                await emitter.emit(ev)
                slowest_emit[0] = max(slowest_emit[0], time.monotonic() - started)
                sent.append(ev.event_id)
            await asyncio.sleep(0.05)

    async def run() -> tuple[int, int, int]:
        async with Emitter(live_stack.kafka_bootstrap, spool_dir=tmp_path / "spool", delivery_timeout_s=3) as emitter:
            stop = asyncio.Event()
            loader = asyncio.create_task(load(emitter, stop))
            await wait_async(lambda: emitter.delivered >= 500, 60, "deliveries before the outage")
            await asyncio.to_thread(kafka.stop, live_stack)
            down = time.monotonic()
            await wait_async(lambda: emitter.spooled > 0, 30, "the emitter to spool")
            await asyncio.sleep(max(0.0, 30 - (time.monotonic() - down)))  # the outage lasts 30 s: the scenario
            spooled_while_down = emitter.spooled
            await asyncio.to_thread(kafka.start, live_stack)
            await wait_async(lambda: emitter.delivered >= len(sent) - 2000, 120, "the spool to be replayed")
            stop.set()
            await loader
            await emitter.flush()
            return spooled_while_down, emitter.delivered, emitter.failed

    spooled, delivered, failed = asyncio.run(run())
    total = len(sent)
    assert spooled > 1000 and failed == 0 and delivered >= total  # a copy may have been delivered twice
    assert slowest_emit[0] < 0.1
    wait_for(lambda: counted(redis_client, org, key, window) == total, 180, f"all {total} counted",
             lambda: f"counted={counted(redis_client, org, key, window)}\n{pipeline.logs()}")
    pipeline.wait_caught_up(180)
    pipeline.wait_processor_applied(redis_client)
    assert counted(redis_client, org, key, window) == total  # none twice
    pipeline.stop("sink")
    rows = pipeline.query_clickhouse(
        "SELECT uniqExact(event_id), count() FROM requests WHERE org_id = {o:String}", {"o": org})
    assert rows[0] == (total, total)  # every event stored, none twice
    ids = asyncio.run(event_ids_on_kafka(live_stack, org))
    assert set(ids) == set(sent)  # on Kafka at least once (copies are what the stages drop)


async def wait_async(cond, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        await asyncio.sleep(0.1)
