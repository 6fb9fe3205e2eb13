"""The Faust app: counts requests per API key per minute, writes decisions to Redis,
dead-letters invalid events.

Guarantee: at-least-once delivery, idempotent effect. A batch is acknowledged
(its offsets become committable) only once its decisions are in Redis and its
changelog records and dead letters are on the broker. The table also holds each
partition's next offset: records Faust delivers twice or skips are caught by
OffsetGuard; records redelivered after a crash are recognised by their offset
and not counted twice (window_counts keeps, per key, the last offset applied).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Awaitable, Sequence

import faust
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, TopicPartition
from faust.types import TP
from prometheus_client import Counter, Gauge, Histogram

from processors.backend import RedisBackend
from processors.decisions import decide
from processors.limits import DEFAULT_LIMITS, MINUTE_MS
from processors.offset_guard import APPLY, REDELIVERED, REFETCH, OffsetGuard, next_offset_key
from processors.window_counts import apply_event
from quotaflow.settings import Settings
from schemas import deadletter
from schemas.events import SchemaError, decode
from schemas.topics import DEAD_LETTER_TOPIC, EVENTS_TOPIC, PROCESSOR_APP_ID

log = logging.getLogger(__name__)

EVENTS = Counter("quotaflow_processor_events_total", "Events consumed by the processor, by outcome", ["outcome"])
DECISIONS = Counter("quotaflow_processor_decisions_written_total", "Decisions written to Redis")
BATCH_SECONDS = Histogram("quotaflow_processor_batch_seconds", "Time to process one batch",
                          buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
READY = Gauge("quotaflow_processor_ready", "1 once partitions are assigned and tables recovered")
TABLE_NAME = "key-minute-counts"


class RequestCounter:
    """Handles one batch of events: the processor's work, apart from Faust's plumbing."""

    def __init__(self, table: faust.Table, dead_letters: faust.TopicT, backend: RedisBackend, guard: OffsetGuard):
        self.table = table
        self.dead_letters = dead_letters
        self.backend = backend
        self.guard = guard

    async def handle(self, events: Sequence[faust.types.EventT]) -> None:
        started = time.perf_counter()
        data = self.table.data
        touched: dict[str, tuple[int, str]] = {}  # api_key_id -> (partition, org_id)
        changed: set[str] = set()
        partitions: set[int] = set()
        pending: list[Awaitable] = []  # deliveries to the broker
        for event in events:
            msg = event.message
            verdict = await self.guard.check(msg.partition, msg.offset)
            if verdict == REFETCH:
                EVENTS.labels("refetch").inc()
                continue
            partitions.add(msg.partition)
            try:
                ev = decode(msg.value)
            except SchemaError as exc:
                if verdict == APPLY:
                    pending.append(await self._dead_letter(msg, exc))
                else:
                    EVENTS.labels(REDELIVERED).inc()
                continue
            key = ev.api_key_id
            if verdict == APPLY:
                outcome, state = apply_event(data.get(key), ev.ts_ms, msg.partition, msg.offset, MINUTE_MS)
            else:
                outcome, state = REDELIVERED, None
            EVENTS.labels(outcome).inc()
            if state is not None:
                data[key] = state
                changed.add(key)
            # Redelivered and late events still refresh the decision: the write
            # that followed their first delivery may have been lost in a crash.
            if key in data:
                touched[key] = (msg.partition, ev.org_id)

        # One changelog record per changed key per batch, not per event, written to
        # the partition of the events that changed it (so it recovers with them);
        # then each partition's next offset, which is only valid once those are in.
        changelog = self.table.changelog_topic
        for key in changed:
            pending.append(await changelog.send(key=key, value=data[key], partition=touched[key][0]))
        for p in partitions:
            pending.append(await changelog.send(key=next_offset_key(p), value=data[next_offset_key(p)], partition=p))

        tiers = await self.backend.org_tiers({org for _, org in touched.values()})
        now = int(time.time() * 1000)
        decisions = []
        for key, (_, org) in touched.items():
            tier = tiers[org]
            decisions.append(decide(key, org, tier.value, DEFAULT_LIMITS[tier], data[key], now))
        await self.backend.write_decisions(decisions)
        DECISIONS.inc(len(decisions))
        # The batch is acknowledged (and its offsets become committable) when this
        # returns, so its changelog and dead letters must be on the broker by then.
        # Faust's own flush before a commit gives up after 0.1 s per message.
        await asyncio.gather(*pending)
        BATCH_SECONDS.observe(time.perf_counter() - started)

    async def _dead_letter(self, msg: Any, exc: SchemaError) -> Awaitable:
        EVENTS.labels("invalid").inc()
        log.warning("invalid event dead-lettered",
                    extra={"reason": str(exc), "partition": msg.partition, "offset": msg.offset})
        return await self.dead_letters.send(
            key=msg.key,
            value=msg.value,
            headers=deadletter.headers(str(exc), deadletter.STAGE_PROCESSOR, topic=msg.topic,
                                       partition=msg.partition, offset=msg.offset,
                                       ts_ms=int(time.time() * 1000)),
        )


def create_app(settings: Settings) -> faust.App:
    app = faust.App(
        PROCESSOR_APP_ID,
        broker=[f"kafka://{host}" for host in settings.kafka_bootstrap.split(",")],
        store="memory://",
        topic_partitions=settings.events_partitions,
        topic_replication_factor=1,
        web_enabled=False,
        consumer_auto_offset_reset="earliest",
        producer_acks=-1,
        broker_commit_interval=1.0,
        # After a broker restart the first rebalance can see topics without
        # leaders and assign nothing; fresh metadata within seconds makes the
        # group leader notice and rebalance again (default: 5 minutes).
        consumer_metadata_max_age_ms=5000,
        # A worker killed without leaving the group holds its partitions until
        # its session times out; Faust's default of 60 s stalls a restart that long.
        broker_session_timeout=15.0,
    )
    events_topic = app.topic(EVENTS_TOPIC, key_type=bytes, value_type=bytes,
                             key_serializer="raw", value_serializer="raw",
                             partitions=settings.events_partitions)
    dead_topic = app.topic(DEAD_LETTER_TOPIC, key_type=bytes, value_type=bytes,
                           key_serializer="raw", value_serializer="raw")
    table = app.Table(TABLE_NAME, default=None, partitions=settings.events_partitions,
                      schema=faust.Schema(key_type=str, key_serializer="raw", value_serializer="json"))

    running: dict[str, RequestCounter] = {}

    @app.on_rebalance_complete.connect
    async def _ready(sender: Any, **kwargs: Any) -> None:
        if "counter" in running:
            running["counter"].guard.reset()
        READY.set(1)

    @app.timer(1.0)
    async def _reseek() -> None:
        if "counter" in running:
            await running["counter"].guard.reseek_stale()

    @app.agent(events_topic)
    async def count_requests(stream: faust.StreamT) -> None:
        redis = aioredis.Redis.from_url(settings.redis_url)
        probe = OffsetProbe(settings.kafka_bootstrap, EVENTS_TOPIC)
        await probe.start()

        async def seek(partition: int, offset: int) -> None:
            log.warning("records skipped by the stream; seeking back", extra={"partition": partition, "offset": offset})
            await app.consumer.seek(TP(EVENTS_TOPIC, partition), offset)

        counter = running["counter"] = RequestCounter(table, dead_topic, RedisBackend(redis),
                                                      OffsetGuard(table.data, probe.first_offset, seek))
        try:
            async for batch in stream.take_events(settings.processor_batch_size,
                                                  within=settings.processor_batch_seconds):
                await counter.handle(batch)
        finally:
            running.pop("counter", None)
            await probe.stop()
            await redis.aclose()

    return app


class OffsetProbe:
    """Asks the broker which record really comes next in a partition (for OffsetGuard)."""

    def __init__(self, bootstrap: str, topic: str):
        self.topic = topic
        self._consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                                          auto_offset_reset="earliest")

    async def start(self) -> None:
        await self._consumer.start()

    async def stop(self) -> None:
        await self._consumer.stop()

    async def first_offset(self, partition: int, offset: int) -> int | None:
        tp = TopicPartition(self.topic, partition)
        self._consumer.assign([tp])
        self._consumer.seek(tp, offset)
        for _ in range(10):
            records = (await self._consumer.getmany(tp, timeout_ms=500, max_records=1)).get(tp)
            if records:
                return records[0].offset
        return None
