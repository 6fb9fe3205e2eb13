"""The alert history: every record of the alert history topic (a transition of an alert,
a delivery attempt: schemas/alert_history.py) as a row of alert_history
(schemas/clickhouse/0006), in the sink since the embedded engine can be open in one
process only. The alerts stage writes the records; this stores them.

Exactly once by row id: the table is a ReplacingMergeTree on (org, row id), so a record
stored again (the sink restarted between an insert and its commit) or written again (the
alerts stage replayed a step) is the same row; each insert also carries a token of its
offset range. Its own consumer group (SINK_ALERTS_GROUP). Records that do not parse are
skipped, counted and logged. ClickHouse or the broker failing: the batch is retried until
it is stored, never skipped.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime, timezone

import msgspec
from aiokafka import AIOKafkaConsumer
from aiokafka.errors import KafkaError
from clickhouse_connect.driver.client import Client
from prometheus_client import Counter

from quotaflow.core.retry import GaveUp, Pause, retry
from quotaflow.core.settings import Settings
from quotaflow.schemas.alert_history import HistoryRecord
from quotaflow.schemas.clickhouse.client import connect
from quotaflow.schemas.clickhouse.tables import ALERT_HISTORY, ALERT_HISTORY_COLUMNS
from quotaflow.schemas.topics import ALERT_HISTORY_TOPIC, SINK_ALERTS_GROUP
from quotaflow.sinks.clickhouse.inserts import INSERT_RETRY_MAX_S
from quotaflow.sinks.clickhouse.kafka_side import REFUSED

log = logging.getLogger(__name__)

RECORDS = Counter("quotaflow_sink_alert_history_total",
                  "Records of the alert history topic taken by the sink, by outcome (stored, invalid_skipped)",
                  ["outcome"])


def row(rec: HistoryRecord, partition: int, offset: int) -> list:
    """A record as the table keeps it, in ALERT_HISTORY_COLUMNS order."""
    return [rec.row_id, rec.record, datetime.fromtimestamp(rec.at_ms / 1000, tz=timezone.utc), rec.org_id,
            rec.api_key_id or "", rec.fingerprint, rec.rule_org_id, rec.rule_id, rec.rule_type, rec.severity, rec.kind,
            rec.episode, rec.from_status, rec.to_status, rec.value, rec.threshold, rec.notification_id, rec.muted,
            rec.channel, rec.attempt, rec.outcome, rec.error, partition, offset]


class AlertHistory:
    def __init__(self, settings: Settings, pause: Pause):
        """``pause``: between retries; raises GaveUp once the sink is stopping."""
        self.settings = settings
        self._pause = pause
        self.consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, group_id=SINK_ALERTS_GROUP,
                                         enable_auto_commit=False, auto_offset_reset="earliest",
                                         metadata_max_age_ms=5000)
        self.client: Client | None = None

    async def run(self, stop: asyncio.Event) -> None:
        """Store the history until ``stop`` is set."""
        self.client = await asyncio.to_thread(connect, self.settings.clickhouse_url)  # a client of its own
        try:
            await self.consumer.start()
            self.consumer.subscribe([ALERT_HISTORY_TOPIC])
            while not stop.is_set():
                got = await self.consumer.getmany(timeout_ms=500, max_records=1000)
                for tp, records in got.items():
                    await self._store(tp, records)
        except GaveUp:
            pass
        finally:
            await self.consumer.stop()
            self.client.close()

    async def _store(self, tp, records: list) -> None:
        rows = []
        for rec in records:
            try:
                rows.append(row(HistoryRecord.decode(rec.value or b""), rec.partition, rec.offset))
            except (msgspec.DecodeError, msgspec.ValidationError, ValueError, OverflowError, OSError) as exc:
                log.warning("alert history skipped a record it cannot store",
                            extra={"partition": rec.partition, "offset": rec.offset, "error": str(exc)[:200]})
                RECORDS.labels("invalid_skipped").inc()
        if rows:
            token = f"{tp.topic}/{tp.partition}/{records[0].offset}-{records[-1].offset}"
            await retry(lambda: asyncio.to_thread(self._insert, rows, token), "clickhouse insert of alert history",
                        on=Exception, max_s=INSERT_RETRY_MAX_S, pause=self._pause, logger=log)
            RECORDS.labels("stored").inc(len(rows))
        try:
            await retry(lambda: self.consumer.commit({tp: records[-1].offset + 1}), "alert history offset commit",
                        on=KafkaError, unless=lambda exc: isinstance(exc, REFUSED), pause=self._pause, logger=log)
        except REFUSED as exc:  # the partition went elsewhere: its next owner stores the same rows again
            log.warning("alert history commit refused after a rebalance", extra={"error": str(exc)})

    def _insert(self, rows: list[list], token: str) -> None:
        self.client.insert(ALERT_HISTORY, rows, column_names=list(ALERT_HISTORY_COLUMNS),
                           settings={"insert_deduplicate": 1, "insert_deduplication_token": token})
