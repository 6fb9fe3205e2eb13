"""ClickHouse sink: raw events from Kafka into the ``requests`` table (and, through
materialized views, the rollups), each event stored exactly once.

Its own consumer group, so it reads every event whatever the processors do.
Records are buffered per partition and stored in batches of one partition's offset
range, following the plan protocol of sinks/clickhouse/plans.py: plan committed,
insert with a token derived from the range, range committed. A crash anywhere in
between makes the next owner of the partition insert the same range with the same
token, which ClickHouse drops if it had already stored it. After such a retry the
sink checks each table for the batch and adds what the engine dropped by mistake
(sinks/clickhouse/repair.py).

- Failed inserts are retried with backoff, never skipped; meanwhile the buffers fill
  up to their bound and fetching stops, so memory stays bounded (the batches in flight
  and one bound of buffered records) however slow ClickHouse is.
- Rows ClickHouse refuses as data (see writer.is_rejection) are isolated by halving
  the batch and go to the dead-letter topic with ClickHouse's reason, stage ``sink``.
- Schema-invalid events, and events too far in time from their record's arrival, are
  skipped and counted: the processor is the stage that dead-letters them (by the same
  rules, judged against the record's broker timestamp), so each lands in the
  dead-letter topic once. The processor's forwarded copies are skipped too: the
  original is stored.
- An event already stored from another record (published twice) is taken out of the
  batch before it is planned (sinks/clickhouse/duplicates.py); while Redis is
  unreachable the batch waits: nothing is stored unchecked.
- Each row is stamped with the org's tier from Redis (sinks/clickhouse/tier_cache.py).
- Beside the events, the keys topic: each change of an API key an audit row
  (sinks/clickhouse/key_audit.py), exactly once by key and version; and the alert history
  topic: each transition and delivery attempt of an alert a row (alert_history.py).

The sink's modules, one job each: this one starts and stops it; batches.py (batch
selection), pipeline.py (the loop: decode, check, store), kafka_side.py (the consumer,
plans, commits, dead letters), inserts.py (inserts retried, refused rows halved),
writer.py, rows.py, duplicates.py, repair.py, tier_cache.py, metrics.py; topic_table.py (a
topic stored as a table, record by record), for key_audit.py (the audit trail of API key
changes) and alert_history.py.
"""

from __future__ import annotations

import asyncio
import logging

from clickhouse_connect.driver.client import Client

from quotaflow.core.redis_clients import async_client
from quotaflow.core.retry import GaveUp, pause_until
from quotaflow.core.settings import Settings
from quotaflow.schemas.clickhouse import retention
from quotaflow.schemas.clickhouse.client import connect
from quotaflow.schemas.clickhouse.migrate import migrate
from quotaflow.schemas.dedup import DuplicateCheck
from quotaflow.schemas.limits import policy_from_settings
from quotaflow.schemas.redis_keys import stored_key
from quotaflow.sinks.clickhouse.inserts import Inserter
from quotaflow.sinks.clickhouse.kafka_side import KafkaSide
from quotaflow.sinks.clickhouse.alert_history import alert_history
from quotaflow.sinks.clickhouse.key_audit import key_audit
from quotaflow.sinks.clickhouse.metrics import READY
from quotaflow.sinks.clickhouse.pipeline import Pipeline
from quotaflow.sinks.clickhouse.tier_cache import TierCache
from quotaflow.sinks.clickhouse.writer import Writer, partitions_bound

log = logging.getLogger(__name__)


class ClickHouseSink:
    def __init__(self, settings: Settings, client: Client | None = None):
        self.settings = settings
        self.client = client
        self._stop = asyncio.Event()
        self._opened = False

    def stop(self) -> None:
        """Stop soon: the batch being stored ends, or is left to its plan when ClickHouse,
        Redis or the broker is failing (its retries give up)."""
        self._stop.set()

    async def open(self) -> None:
        """Connect to ClickHouse, apply the migrations and the retention settings."""
        if self.client is None:
            self.client = await asyncio.to_thread(connect, self.settings.clickhouse_url)
        await asyncio.to_thread(migrate, self.client)
        await asyncio.to_thread(retention.apply, self.client, self.settings)
        self._opened = True

    async def run(self) -> None:
        if not self._opened:
            await self.open()
        settings = self.settings
        pause = pause_until(self._stop)  # retries give up (GaveUp) once the sink is asked to stop
        tiers = TierCache(settings.redis_url, policy_from_settings(settings).tier_of, cluster=settings.redis_cluster)
        redis = async_client(settings, socket_timeout=10.0, socket_connect_timeout=2.0)
        kafka = KafkaSide(settings, pause)
        inserter = Inserter(Writer(self.client, partitions_bound(settings.retention_raw_days)), kafka.dead_letter, pause)
        pipeline = Pipeline(settings, self.client, kafka, inserter, tiers,
                            DuplicateCheck(redis, stored_key, settings.dedup_window_s), self._stop, pause)
        await kafka.start(pipeline.listener())
        audit = asyncio.create_task(key_audit(settings, pause).run(self._stop))
        audit.add_done_callback(lambda task: task.cancelled() or task.exception() is None or self._stop.set())
        history = asyncio.create_task(alert_history(settings, pause).run(self._stop))
        history.add_done_callback(lambda task: task.cancelled() or task.exception() is None or self._stop.set())
        log.info("clickhouse sink started", extra={"clickhouse": settings.clickhouse_url.split("@")[-1]})
        try:
            await pipeline.run()
        except GaveUp:
            pass
        finally:
            self._stop.set()
            await asyncio.wait({audit, history})
            await kafka.stop()
            await tiers.close()
            await redis.aclose()
            READY.set(0)
            log.info("clickhouse sink stopped")
        for side in (audit, history):
            if not side.cancelled() and side.exception() is not None:
                raise side.exception()  # it failed: the sink stops with it (its supervisor restarts them all)
