"""An event published twice (same event_id, two Kafka records) is counted once by the
processor and stored once by the sink, in the raw table and every rollup, on the real
stack: copies in one batch and in different batches, a batch claimed and then lost
before its insert landed (openmeter#5118: the retried event must not be taken for its
own duplicate), the sink killed mid-stream, and Redis down (the sink waits; it never
stores unchecked)."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, TopicPartition

from quotaflow.deploy import redis as redis_service
from quotaflow.deploy.observe import end_offsets
from quotaflow.schemas.clickhouse.client import connect
from quotaflow.schemas.clickhouse.tables import ALL_ROLLUPS, RAW
from quotaflow.schemas.dedup import DuplicateCheck, position
from quotaflow.schemas.redis_keys import stored_key
from quotaflow.schemas.topics import EVENTS_TOPIC, SINK_CLICKHOUSE_GROUP
from quotaflow.sinks.clickhouse import duplicates
from quotaflow.sinks.clickhouse.plans import Range
from quotaflow.sinks.clickhouse.rows import to_rows
from quotaflow.sinks.clickhouse.writer import Writer
from tests.pipeline import (
    SINK_REPAIRS,
    SINK_INSERTED,
    SINK_REPLAYED,
    counted,
    event,
    kill_sink_mid_batches,
    pending_plans,
    publish,
    this_minute,
    unique,
    wait_for,
)
from tests.storage import records

pytestmark = pytest.mark.stack
STORED = 'quotaflow_sink_events_total{outcome="stored"}'
SINK_DUPLICATES = 'quotaflow_sink_events_total{outcome="duplicate"}'
PROCESSOR_DUPLICATES = 'quotaflow_processor_events_total{outcome="duplicate"}'
INSERTS = "quotaflow_sink_insert_seconds_count"


def stored_per_table(pipeline, org: str) -> dict[str, tuple[int, ...]]:
    """Per table: (rows, distinct event ids) of the raw table, requests of each rollup."""
    p = {"o": org}
    out = {RAW: tuple(pipeline.query_clickhouse(
        f"SELECT count(), uniqExact(event_id) FROM {RAW} WHERE org_id = {{o:String}}", p)[0])}
    for table in ALL_ROLLUPS:
        out[table.name] = (pipeline.query_clickhouse(
            f"SELECT sum(requests) FROM {table.name} WHERE org_id = {{o:String}}", p)[0][0],)
    return out


def once_each(n: int) -> dict[str, tuple[int, ...]]:
    return {RAW: (n, n), **{t.name: (n,) for t in ALL_ROLLUPS}}


def test_events_published_twice_are_counted_once_and_stored_once(live_stack, redis_client, pipeline):
    one, apart = unique("dup1"), unique("dup2")  # copies in one sink batch / in different batches
    pipeline.start("processor")
    # A batch is taken 3 s after its first record arrives (or at 10,000 records): the 20
    # records of a publication published at once fall in one batch.
    pipeline.start("sink", QUOTAFLOW_SINK_BATCH_SECONDS="3")
    pipeline.wait_caught_up()  # what earlier tests left on the topic is behind us: metrics from here on are ours
    base = {(name, sample): pipeline.metric(name, sample) for name, sample in
            (("processor", PROCESSOR_DUPLICATES), ("sink", STORED), ("sink", SINK_DUPLICATES), ("sink", INSERTS))}

    def delta(name: str, sample: str) -> float:
        return pipeline.metric(name, sample) - base[(name, sample)]

    window = this_minute()
    evs = {org: [event(org, f"{org}-key", window + 100 * i) for i in range(10)] for org in (one, apart)}

    # Copies in one batch: each event, then its copy, each in a record of its own.
    asyncio.run(publish(live_stack, [e for ev in evs[one] for e in (ev, ev)], batch_events=1))
    wait_for(lambda: delta("sink", STORED) + delta("sink", SINK_DUPLICATES) >= 20, 60,
             "the sink to take the first 20 records", pipeline.logs)
    assert delta("sink", INSERTS) == 1  # one batch
    # Copies in different batches: the copies published once the originals are stored.
    asyncio.run(publish(live_stack, evs[apart], batch_events=1))
    wait_for(lambda: delta("sink", STORED) >= 20, 60, "the originals to be stored", pipeline.logs)
    asyncio.run(publish(live_stack, evs[apart], batch_events=1))

    for org in (one, apart):
        wait_for(lambda: counted(redis_client, org, f"{org}-key", window) == 10
                 and counted(redis_client, org, None, window) == 10, 60, f"{org} counted", pipeline.logs)
    pipeline.wait_caught_up()
    assert delta("processor", PROCESSOR_DUPLICATES) == 20
    # The copies of the second org alone made a batch with nothing to insert.
    assert (delta("sink", STORED), delta("sink", SINK_DUPLICATES), delta("sink", INSERTS)) == (20, 20, 2)
    pipeline.stop("sink")
    for org in (one, apart):
        assert stored_per_table(pipeline, org) == once_each(10), org
    # The copy kept is the original: the first place that carried the event.
    kept = dict(pipeline.query_clickhouse(f"SELECT toString(event_id), kafka_offset FROM {RAW} "
                                          "WHERE org_id = {o:String}", {"o": one}))
    assert set(kept) == {e.event_id for e in evs[one]}
    offsets = sorted(kept.values())
    assert offsets == [offsets[0] + 2 * i for i in range(10)]
    assert counted(redis_client, one, None, window) == counted(redis_client, apart, None, window) == 10


def test_the_sink_takes_out_the_copies_of_a_batch(live_stack):
    """sinks/clickhouse/duplicates.py on a decoded batch of several orgs: copies published
    in other records are taken out, in the batch and after it; the same records read
    again lose exactly the same rows."""
    m = this_minute()
    a, b = unique("a"), unique("b")
    evs = [event(org, f"{org}-key", m + i) for i, org in enumerate([a, b, a, b, a])]
    batch = evs + [evs[0], evs[3]]  # two copies, each in a record of its own
    recs = records(batch, partition=2, first_offset=100)

    async def check(recs) -> tuple[list, int]:
        client = aioredis.Redis.from_url(live_stack.redis_url)
        try:
            rows = to_rows(recs)
            groups = duplicates.groups(rows, 2)
            answers = await DuplicateCheck(client, stored_key, 60).duplicates(groups)
            kept, n = duplicates.without(rows, answers)
            return [(r.offset, i) for r, i in zip(kept.records, kept.indexes)], n
        finally:
            await client.aclose()

    first = asyncio.run(check(recs))
    assert first == ([(100 + i, 0) for i in range(5)], 2)
    assert asyncio.run(check(recs)) == first  # a replay of the same batch
    later = records([evs[1], event(a, f"{a}-key", m)], partition=2, first_offset=200)
    assert asyncio.run(check(later)) == ([(201, 0)], 1)
    assert position(200, 3) == (200 << 16) | 3


@pytest.mark.parametrize("landed", [None, "everywhere", RAW], ids=["lost", "landed", "landed-but-raw-lost"])
def test_a_batch_claimed_before_its_insert_failed_is_stored_once_not_zero_times(live_stack, redis_client, pipeline,
                                                                                landed):
    """openmeter#5118: their check claimed an event id before the write and never released
    it when the write failed, so the retried event was taken for a duplicate of itself and
    metered zero times. Here the sink's state after such a failure is set up exactly: the
    plan committed, the batch's events claimed in Redis by the sink's own check, the insert
    lost (the sink killed before it landed), or landed without its final commit, or landed
    but lost from the raw table by a crash inside the engine (which then drops the replay:
    the repair adds the rows, and must not add the copies). The restarted sink replays the
    plan: every event stored once, the copies taken out (the one in the planned range and
    the ones after it) and nothing else."""
    org = unique("claim")
    evs = [event(org, f"{org}-key", int(time.time() * 1000) - i) for i in range(300)]
    pipeline.start("sink")
    pipeline.wait_sink_caught_up()
    before = asyncio.run(end_offsets(live_stack.kafka_bootstrap, EVENTS_TOPIC))
    pipeline.stop("sink")
    asyncio.run(publish(live_stack, evs, batch_events=50))  # 6 records
    asyncio.run(publish(live_stack, evs[:100], batch_events=50))  # their copies: 2 records
    after = asyncio.run(end_offsets(live_stack.kafka_bootstrap, EVENTS_TOPIC))
    (partition,) = [p for p in after if after[p] != before[p]]  # one org: one partition
    assert after[partition] - before[partition] == 8

    async def crash_state() -> tuple[Range, list[str]]:
        tp = TopicPartition(EVENTS_TOPIC, partition)
        consumer = AIOKafkaConsumer(bootstrap_servers=live_stack.kafka_bootstrap, group_id=SINK_CLICKHOUSE_GROUP,
                                    enable_auto_commit=False)
        await consumer.start()
        client = aioredis.Redis.from_url(live_stack.redis_url)
        try:
            consumer.assign([tp])
            consumer.seek(tp, before[partition])
            recs = []
            while len(recs) < 8:
                recs += (await consumer.getmany(tp, timeout_ms=1000)).get(tp, [])
            recs = recs[:7]  # the planned batch: the originals and the first record of copies
            batch = Range(EVENTS_TOPIC, partition, recs[0].offset, recs[-1].offset)
            await consumer.commit({tp: (batch.start, batch.plan_metadata())})
            # What the sink does before it inserts: its check, which claims every event.
            rows = to_rows(recs)
            groups = duplicates.groups(rows, partition)
            answers = await DuplicateCheck(client, stored_key, live_stack.dedup_window_s).duplicates(groups)
            rows, taken_out = duplicates.without(rows, answers)
            assert (len(rows), taken_out) == (300, 50)
            places = [f"{partition}:{position(r.offset, i)}" for r, i in zip(rows.records, rows.indexes)]
            if landed:
                ch = connect(live_stack.clickhouse_url)
                try:
                    rows.set_tiers({org: "FREE"})
                    Writer(ch).insert(rows, batch.token())
                    if landed == RAW:  # the deduplication log keeps the token: the replay is dropped
                        ch.command(f"DELETE FROM {RAW} WHERE org_id = {{org:String}}", parameters={"org": org})
                finally:
                    ch.close()
            return batch, places
        finally:
            await client.aclose()
            await consumer.stop()

    batch, places = asyncio.run(crash_state())
    assert pending_plans(live_stack) == [batch]
    # The claims are there: each event at the place of its original.
    m = {e.event_id: e.ts_ms for e in evs}
    assert [redis_client.hget(stored_key(org, m[e.event_id]), e.event_id).decode() for e in evs] == places

    pipeline.start("sink")
    pipeline.wait_sink_caught_up()
    replayed, taken_out = pipeline.metric("sink", SINK_REPLAYED), pipeline.metric("sink", SINK_DUPLICATES)
    repaired = pipeline.metric("sink", f'{SINK_REPAIRS}{{outcome="added",table="{RAW}"}}')
    pipeline.stop("sink")
    assert (replayed, taken_out, repaired) == (1, 100, 1 if landed == RAW else 0)
    assert stored_per_table(pipeline, org) == once_each(300)
    assert pending_plans(live_stack) == []


BATCH = 500
UNIQUE = 9000


def test_sink_killed_mid_stream_with_copies_in_it_stores_each_event_once(live_stack, pipeline, monkeypatch):
    monkeypatch.setenv("QUOTAFLOW_SINK_BATCH_SIZE", str(BATCH))
    orgs = [unique("killdup") for _ in range(3)]
    now = int(time.time() * 1000)
    evs = [event(orgs[i % 3], f"{orgs[i % 3]}-key", now - i, status=(200, 404, 500, 429)[i % 4])
           for i in range(UNIQUE)]
    # Events of every org published twice: some copies right behind the original, some
    # 3,000 events later (across batches, and across the kills below).
    stream = []
    for i, e in enumerate(evs):
        stream.append(e)
        if i // 3 % 3 == 0:
            stream.append(e)
        if i // 3 % 3 == 2 and i >= 3000:
            stream.append(evs[i - 3000])
    copies = len(stream) - UNIQUE
    asyncio.run(publish(live_stack, stream[:len(stream) // 2], batch_events=1))
    failed: list[BaseException] = []

    def publish_rest() -> None:
        try:
            asyncio.run(publish(live_stack, stream[len(stream) // 2:], batch_events=1))
        except BaseException as exc:  # noqa: BLE001 - reported below
            failed.append(exc)

    rest = threading.Thread(target=publish_rest)
    kills = []
    pipeline.start("sink")
    rest.start()
    kills += kill_sink_mid_batches(pipeline, live_stack, 2 * BATCH)  # each aimed at a batch checked and planned
    rest.join()
    assert not failed, f"publishing the second half failed: {failed!r}"
    pipeline.wait_sink_caught_up()
    pipeline.stop("sink")

    assert any(kills), f"no kill landed between a plan and its commit: {kills}"
    assert copies > 4000
    got = {org: stored_per_table(pipeline, org) for org in orgs}
    assert got == {org: once_each(UNIQUE // 3) for org in orgs}
    ids = {r[0] for r in pipeline.query_clickhouse(
        f"SELECT toString(event_id) FROM {RAW} WHERE org_id IN {{o:Array(String)}}", {"o": orgs})}
    assert ids == {e.event_id for e in evs}


def test_redis_down_the_sink_waits_and_stores_nothing_unchecked(live_stack, pipeline):
    org = unique("nodedup")
    evs = [event(org, f"{org}-key", int(time.time() * 1000) - i) for i in range(50)]
    pipeline.start("sink")
    pipeline.wait_sink_caught_up()
    asyncio.run(publish(live_stack, evs, batch_events=10))
    pipeline.wait_sink_caught_up()
    inserted = pipeline.metric("sink", SINK_INSERTED)

    redis_service.stop(live_stack)
    try:
        asyncio.run(publish(live_stack, evs[:20] + [event(org, f"{org}-key", evs[0].ts_ms + 1)], batch_events=10))
        wait_for(lambda: "check duplicates" in pipeline.logs("sink"), 60, "the sink to find Redis down")
        wait_for(lambda: pipeline.metric("sink", "quotaflow_sink_duplicate_check_failures_total") >= 3, 60,
                 "the sink to retry")
        assert pipeline.metric("sink", SINK_INSERTED) == inserted  # nothing stored without the check
    finally:
        redis_service.start(live_stack)
    pipeline.wait_sink_caught_up()
    assert pipeline.metric("sink", SINK_INSERTED) == inserted + 1
    assert pipeline.metric("sink", SINK_DUPLICATES) == 20
    pipeline.stop("sink")
    assert stored_per_table(pipeline, org) == once_each(51)
