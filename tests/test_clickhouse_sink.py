"""The ClickHouse sink on the real stack: every valid event stored exactly once across
SIGKILLs mid-batch, a batch that had landed before a crash not stored twice, rows
ClickHouse refuses dead-lettered with its reason, rollups equal to the raw rows, each
row's tier read from Redis and read again once the cached one is stale."""

from __future__ import annotations

import asyncio
import threading
import time
from itertools import pairwise

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from quotaflow.deploy.observe import end_offsets
from quotaflow.schemas import deadletter
from quotaflow.schemas.clickhouse.client import connect
from quotaflow.schemas.limits import policy_from_settings
from quotaflow.schemas.redis_keys import ORG_TIER_FIELD, org_key
from quotaflow.schemas.topics import DEAD_LETTER_TOPIC, EVENTS_TOPIC, SINK_CLICKHOUSE_GROUP
from quotaflow.sinks.clickhouse.plans import Range
from quotaflow.sinks.clickhouse.rows import to_rows
from quotaflow.sinks.clickhouse.tier_cache import TierCache
from quotaflow.sinks.clickhouse.writer import Writer
from tests.pipeline import (
    SINK_REPAIRS,
    SINK_REPLAYED,
    event,
    kill_sink_mid_batches,
    pending_plans,
    publish,
    read_all,
    unique,
)

pytestmark = pytest.mark.stack
BUFFERED = "quotaflow_sink_buffered_records"
BATCH = 1000
# Enough for three sinks to each store 2 * BATCH and be killed before the stream runs
# out: a sink stores a backlog of one-event records at tens of thousands a second.
TOTAL = 30_000


def offset_gaps(pipeline, orgs: list[str]) -> dict[int, list[tuple[int, int]]]:
    """Per partition, the runs of offsets missing between stored rows of these orgs (the
    invalid records published among them show up here too): what to look at when a test fails."""
    offsets: dict[int, list[int]] = {}
    for p, o in pipeline.query_clickhouse("SELECT kafka_partition, kafka_offset FROM requests "
                                          "WHERE org_id IN {o:Array(String)} ORDER BY 1, 2", {"o": orgs}):
        offsets.setdefault(p, []).append(o)
    return {p: [(a + 1, b - 1) for a, b in pairwise(offs) if b > a + 1] for p, offs in offsets.items()}


def stored(pipeline, orgs: list[str]) -> tuple[int, int, set[str], dict[str, int]]:
    """(rows, distinct event ids, event ids, requests per rollup) for these orgs."""
    rows, distinct = pipeline.query_clickhouse(
        "SELECT count(), uniqExact(event_id) FROM requests WHERE org_id IN {o:Array(String)}", {"o": orgs})[0]
    ids = {r[0] for r in pipeline.query_clickhouse(
        "SELECT toString(event_id) FROM requests WHERE org_id IN {o:Array(String)}", {"o": orgs})}
    rollups = {t: pipeline.query_clickhouse(f"SELECT sum(requests) FROM {t} WHERE org_id IN {{o:Array(String)}}",
                                            {"o": orgs})[0][0] for t in ("requests_1m", "requests_1h", "requests_1d")}
    return rows, distinct, ids, rollups


def test_sink_killed_mid_batch_stores_every_valid_event_exactly_once(live_stack, redis_client, pipeline, monkeypatch):
    monkeypatch.setenv("QUOTAFLOW_SINK_BATCH_SIZE", str(BATCH))
    orgs = [unique("kill") for _ in range(3)]  # several orgs: several partitions
    redis_client.hset(org_key(orgs[0]), ORG_TIER_FIELD, "SCALE")
    now = int(time.time() * 1000)
    events = [event(orgs[i % 3], f"{orgs[i % 3]}-key", now - i, status=(200, 404, 500, 429)[i % 4],
                    latency_ms=float(i % 700)) for i in range(TOTAL)]
    invalid = [(orgs[0].encode(), b"not json at all"), (orgs[1].encode(), orjson.dumps({"org_id": orgs[1]}))]
    # One event per record here: batches of BATCH records then hold BATCH events, and
    # there are enough of them for the kills to land mid-stream.
    asyncio.run(publish(live_stack, events[:TOTAL // 2], invalid, batch_events=1))

    # The rest is published while the sink works through the backlog, so it stays busy.
    failed: list[BaseException] = []  # what publishing the rest raised, if anything

    def publish_rest() -> None:
        try:
            asyncio.run(publish(live_stack, events[TOTAL // 2:], batch_events=1))
        except BaseException as exc:  # noqa: BLE001 - reported by the test below
            failed.append(exc)

    rest = threading.Thread(target=publish_rest)
    kills = []  # per kill: the plans pending in the committed metadata right after it
    buffered = []
    pipeline.start("sink")
    rest.start()
    kills += kill_sink_mid_batches(pipeline, live_stack, 2 * BATCH,
                                   before_each=lambda: buffered.append(pipeline.metric("sink", BUFFERED)))
    rest.join()
    assert not failed, f"publishing the second half failed: {failed!r}"
    pipeline.wait_sink_caught_up()
    pipeline.stop("sink")

    assert any(kills), f"no kill landed between a plan and its commit: {kills}"
    rows, distinct, ids, rollups = stored(pipeline, orgs)
    assert (rows, distinct) == (len(events), len(events)), (  # no loss, no duplicate
        f"offsets missing {offset_gaps(pipeline, orgs)}; plans left by each kill {kills}")
    assert ids == {e.event_id for e in events}
    assert rollups == {t: len(events) for t in rollups}  # the views saw each row once too
    tiers = dict(pipeline.query_clickhouse(
        "SELECT org_id, groupUniqArray(tier) FROM requests WHERE org_id IN {o:Array(String)} GROUP BY org_id",
        {"o": orgs}))
    assert tiers == {orgs[0]: ["SCALE"], orgs[1]: ["FREE"], orgs[2]: ["FREE"]}  # no tier set: the default
    # Backpressure: what the sink held was bounded by its batch size, not by the backlog:
    # one bound of buffered records, plus the batches being stored.
    partitions = len(asyncio.run(end_offsets(live_stack.kafka_bootstrap, EVENTS_TOPIC)))
    assert max(buffered) <= 2 * BATCH * (partitions + 1), buffered


@pytest.mark.parametrize("lost_from", [None, "requests", "requests_org_1h"])
def test_a_batch_stored_before_a_crash_is_not_stored_again(live_stack, pipeline, lost_from):
    """The crash window that matters most: the batch is in ClickHouse, its offsets are
    not committed. Set that state up exactly as the sink leaves it (plan committed,
    rows inserted with the plan's token, no final commit), then start the sink.

    With lost_from, the crash also hit the engine between writing the batch's token to
    that table's deduplication log and publishing its part: the table lacks the rows but
    drops the replay as a duplicate. (Set up by deleting the rows, which leaves the log
    as it is.) The sink must find that and add them to that table alone."""
    org = unique("crash")
    events = [event(org, f"{org}-key", int(time.time() * 1000) - i) for i in range(3000)]
    pipeline.start("sink")
    pipeline.wait_sink_caught_up()
    before = asyncio.run(end_offsets(live_stack.kafka_bootstrap, EVENTS_TOPIC))
    pipeline.stop("sink")  # leaves the group: its offsets may be committed by someone else now
    asyncio.run(publish(live_stack, events))
    after = asyncio.run(end_offsets(live_stack.kafka_bootstrap, EVENTS_TOPIC))
    (partition,) = [p for p in after if after[p] != before[p]]  # one org: one partition
    start = before[partition]

    async def crash_state() -> Range:
        tp = TopicPartition(EVENTS_TOPIC, partition)
        consumer = AIOKafkaConsumer(bootstrap_servers=live_stack.kafka_bootstrap, group_id=SINK_CLICKHOUSE_GROUP,
                                    enable_auto_commit=False)
        await consumer.start()
        try:
            consumer.assign([tp])
            consumer.seek(tp, start)
            recs = []
            while not recs or recs[-1].offset < after[partition] - 1:
                recs += (await consumer.getmany(tp, timeout_ms=1000)).get(tp, [])
            assert len(recs) >= 2, "the emitter put every event in one record; the test needs several"
            recs = recs[:len(recs) // 2]  # the batch covers part of what was published
            batch = Range(EVENTS_TOPIC, partition, recs[0].offset, recs[-1].offset)
            await consumer.commit({tp: (batch.start, batch.plan_metadata())})
            client = connect(live_stack.clickhouse_url)
            try:
                rows = to_rows(recs)
                rows.set_tiers({org: "FREE"})
                Writer(client).insert(rows, batch.token())
                if lost_from:
                    client.command(f"DELETE FROM {lost_from} WHERE org_id = {{org:String}}", parameters={"org": org})
            finally:
                client.close()
            return batch
        finally:
            await consumer.stop()

    batch = asyncio.run(crash_state())
    assert batch.start == start and pending_plans(live_stack) == [batch]
    pipeline.start("sink")
    pipeline.wait_sink_caught_up()
    replayed = pipeline.metric("sink", SINK_REPLAYED)
    repairs = {k: v for k, v in pipeline.metrics("sink").items() if k.startswith(SINK_REPAIRS + "{")}
    pipeline.stop("sink")

    assert replayed == 1  # the sink did insert the planned range again...
    assert repairs == ({f'{SINK_REPAIRS}{{outcome="added",table="{lost_from}"}}': 1.0} if lost_from else {})
    rows, distinct, ids, rollups = stored(pipeline, [org])
    assert (rows, distinct) == (len(events), len(events))  # ...and ClickHouse kept it once
    assert ids == {e.event_id for e in events}
    assert rollups == {t: len(events) for t in rollups}
    assert pending_plans(live_stack) == []


def test_rows_clickhouse_refuses_are_dead_lettered_with_its_reason(live_stack, pipeline):
    """A CHECK constraint makes the real engine refuse some schema-valid rows."""
    org, poison_org = unique("ok"), unique("poison")
    client = connect(live_stack.clickhouse_url)
    try:
        client.command(f"ALTER TABLE requests ADD CONSTRAINT test_poison CHECK org_id != '{poison_org}'")
    finally:
        client.close()
    try:
        now = int(time.time() * 1000)
        good = [event(org, f"{org}-key", now - i) for i in range(500)]
        bad = [event(poison_org, f"{poison_org}-key", now - i) for i in range(3)]
        pipeline.start("sink")
        # Mixed in one partition's batch or not, the good rows are stored and the bad ones refused.
        asyncio.run(publish(live_stack, good[:250] + bad + good[250:]))
        pipeline.wait_sink_caught_up()
        rejected = pipeline.metric("sink", 'quotaflow_sink_events_total{outcome="rejected"}')
        pipeline.stop("sink")
        rows, distinct, ids, _ = stored(pipeline, [org, poison_org])
    finally:
        pipeline.stop("sink")
        client = connect(live_stack.clickhouse_url)
        try:
            client.command("ALTER TABLE requests DROP CONSTRAINT test_poison")
        finally:
            client.close()
    assert rejected == len(bad)
    assert (rows, distinct) == (len(good), len(good)) and ids == {e.event_id for e in good}
    dead = [r for r in asyncio.run(read_all(live_stack, DEAD_LETTER_TOPIC)) if r.key == poison_org.encode()]
    assert sorted(r.value for r in dead) == sorted(e.encode() for e in bad)  # the original bytes, for replay
    for r in dead:
        h = deadletter.read_headers(r.headers)
        assert h[deadletter.HEADER_STAGE] == "sink"
        assert "VIOLATED_CONSTRAINT" in h[deadletter.HEADER_REASON] and "test_poison" in h[deadletter.HEADER_REASON]
        assert h[deadletter.HEADER_SOURCE_TOPIC] == EVENTS_TOPIC
        assert int(h[deadletter.HEADER_SOURCE_OFFSET]) >= 0 and int(h[deadletter.HEADER_SOURCE_PARTITION]) >= 0


def test_an_orgs_tier_is_kept_while_fresh_and_read_again_once_stale(live_stack, redis_client):
    """sinks/clickhouse/tier_cache.py against the real Redis: a running sink stamps rows with the
    tier it read, until the cached one is older than the cache lifetime (a cache that is
    never fresh shows the reading again without waiting for the lifetime to pass)."""
    org, other = unique("tiered"), unique("untiered")
    redis_client.hset(org_key(org), ORG_TIER_FIELD, "STARTER")  # `other` has none: the default tier
    tier_of = policy_from_settings(live_stack).tier_of

    async def scenario() -> list[dict[str, str]]:
        kept = TierCache(live_stack.redis_url, tier_of, cache_seconds=3600)
        stale = TierCache(live_stack.redis_url, tier_of, cache_seconds=0)
        try:
            before = [await kept.tiers({org, other}), await stale.tiers({org, other})]
            redis_client.hset(org_key(org), ORG_TIER_FIELD, "SCALE")
            return before + [await kept.tiers({org, other}), await stale.tiers({org, other})]
        finally:
            await kept.close()
            await stale.close()

    before_kept, before_stale, after_kept, after_stale = asyncio.run(scenario())
    assert before_kept == before_stale == after_kept == {org: "STARTER", other: "FREE"}
    assert after_stale == {org: "SCALE", other: "FREE"}
