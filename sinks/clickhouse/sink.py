"""ClickHouse sink: raw events from Kafka into the ``requests`` table, in batches.

Its own consumer group, so it reads every event whatever the processors do.
Offsets are committed only after the batch is in ClickHouse (at-least-once); a
failed insert is retried until ClickHouse takes it, and the stream waits
meanwhile. Schema-invalid events are skipped and counted here: the processor
is the stage that dead-letters them, so each lands in the dead-letter topic once.
"""

from __future__ import annotations

import asyncio
import logging
import time

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import CommitFailedError, KafkaError
from clickhouse_connect.driver.client import Client
from prometheus_client import Counter, Gauge, Histogram

from quotaflow.settings import Settings
from schemas.events import SchemaError, decode
from schemas.topics import EVENTS_TOPIC, SINK_CLICKHOUSE_GROUP
from sinks.clickhouse.client import connect
from sinks.clickhouse.migrate import migrate

log = logging.getLogger(__name__)

TABLE = "requests"
COLUMNS = [
    "event_id", "event_time", "org_id", "api_key_id", "service", "endpoint", "method", "status",
    "latency_ms", "request_bytes", "response_bytes", "client_ip", "user_agent", "schema_version",
    "kafka_partition", "kafka_offset",
]

EVENTS = Counter("quotaflow_sink_events_total", "Events consumed by the ClickHouse sink, by outcome", ["outcome"])
ROWS = Counter("quotaflow_sink_rows_inserted_total", "Rows inserted into ClickHouse")
INSERT_SECONDS = Histogram("quotaflow_sink_insert_seconds", "Duration of one ClickHouse insert",
                           buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
READY = Gauge("quotaflow_sink_ready", "1 once the sink has its partitions assigned")
INSERT_FAILURES = Counter("quotaflow_sink_insert_failures_total", "Failed ClickHouse inserts (retried)")


def to_rows(records) -> tuple[list[list], dict[TopicPartition, int]]:
    """Rows for the valid records and, per partition, the next offset to commit."""
    rows = []
    next_offsets: dict[TopicPartition, int] = {}
    for rec in records:
        next_offsets[TopicPartition(rec.topic, rec.partition)] = rec.offset + 1
        try:
            ev = decode(rec.value)
        except SchemaError:
            EVENTS.labels("invalid_skipped").inc()
            continue
        rows.append([
            ev.event_id, ev.ts_ms, ev.org_id, ev.api_key_id, ev.service, ev.endpoint, ev.method, ev.status,
            ev.latency_ms, ev.request_bytes, ev.response_bytes, ev.client_ip, ev.user_agent, ev.schema_version,
            rec.partition, rec.offset,
        ])
    return rows, next_offsets


class ClickHouseSink:
    def __init__(self, settings: Settings, client: Client | None = None):
        self.settings = settings
        self.client = client
        self._stop = asyncio.Event()

    def stop(self) -> None:
        self._stop.set()

    async def _insert(self, rows: list[list]) -> None:
        delay = 0.2
        while True:
            started = time.perf_counter()
            try:
                await asyncio.to_thread(self.client.insert, TABLE, rows, column_names=COLUMNS)
            except Exception as exc:  # any driver/server error: retry, never skip a batch
                INSERT_FAILURES.inc()
                log.warning("clickhouse insert failed, retrying",
                            extra={"error": str(exc)[:500], "rows": len(rows), "retry_in_s": delay})
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
                continue
            INSERT_SECONDS.observe(time.perf_counter() - started)
            ROWS.inc(len(rows))
            EVENTS.labels("stored").inc(len(rows))
            return

    async def _commit(self, consumer: AIOKafkaConsumer, offsets: dict[TopicPartition, int]) -> None:
        """Commit, riding out a broker restart. After a rebalance the offsets are no
        longer ours to commit: the batch will be delivered again (at-least-once)."""
        delay = 0.2
        while True:
            try:
                await consumer.commit(offsets)
                return
            except CommitFailedError as exc:
                log.warning("offset commit refused after a rebalance; the batch will be redelivered",
                            extra={"error": str(exc)})
                return
            except KafkaError as exc:
                log.warning("offset commit failed, retrying", extra={"error": str(exc), "retry_in_s": delay})
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def run(self) -> None:
        if self.client is None:
            self.client = await asyncio.to_thread(connect, self.settings.clickhouse_url)
        await asyncio.to_thread(migrate, self.client)
        consumer = AIOKafkaConsumer(
            EVENTS_TOPIC,
            bootstrap_servers=self.settings.kafka_bootstrap,
            group_id=SINK_CLICKHOUSE_GROUP,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            isolation_level="read_committed",
            max_partition_fetch_bytes=4 * 1024 * 1024,
            metadata_max_age_ms=5000,  # see processors/app.py: recover quickly from a broker restart
        )
        await consumer.start()
        log.info("clickhouse sink started", extra={"clickhouse": self.settings.clickhouse_url.split("@")[-1]})
        batch_size = self.settings.sink_batch_size
        ready = False
        try:
            while not self._stop.is_set():
                records = []
                deadline = None
                while len(records) < batch_size and not self._stop.is_set():
                    wait_s = 0.5 if deadline is None else deadline - time.monotonic()
                    if wait_s <= 0:
                        break
                    got = await consumer.getmany(timeout_ms=int(wait_s * 1000), max_records=batch_size - len(records))
                    if not ready and consumer.assignment():
                        READY.set(1)
                        ready = True
                    for part in got.values():
                        records.extend(part)
                    if records and deadline is None:
                        deadline = time.monotonic() + self.settings.sink_batch_seconds
                if not records:
                    continue
                rows, offsets = to_rows(records)
                if rows:
                    await self._insert(rows)
                await self._commit(consumer, offsets)
        finally:
            await consumer.stop()
            log.info("clickhouse sink stopped")
