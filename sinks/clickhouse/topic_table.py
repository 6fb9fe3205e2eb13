"""A topic stored as a table, record by record, beside the events: what the sink does for
the keys topic (key_audit.py) and the alert history (alert_history.py), in the sink since
the embedded engine can be open in one process only.

Exactly once by the table's own key (each such table is a ReplacingMergeTree on what
names a record), so a record stored again (the sink restarted between an insert and its
commit, or a rebalance) is the same row; each insert also carries a token of its offset
range, so a range inserted again as it was is dropped at once. Its own consumer group:
the events' batches, plans and rebalances are none of its business, nor it theirs.
Records that do not convert are skipped, counted and logged. ClickHouse or the broker
failing: the batch is retried until it is stored, never skipped.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable

from aiokafka import AIOKafkaConsumer
from aiokafka.errors import KafkaError
from clickhouse_connect.driver.client import Client
from prometheus_client import Counter

from quotaflow.core.retry import GaveUp, Pause, retry
from quotaflow.core.settings import Settings
from quotaflow.schemas.clickhouse.client import connect
from quotaflow.sinks.clickhouse.inserts import INSERT_RETRY_MAX_S
from quotaflow.sinks.clickhouse.kafka_side import REFUSED

log = logging.getLogger(__name__)


class Skip(Exception):
    """A record that is not one of the topic's: skipped (``logged``: and said in the log)."""

    def __init__(self, reason: str, logged: bool = True):
        super().__init__(reason)
        self.logged = logged


class TopicTable:
    """Store ``topic`` into ``table`` until stopped. ``row(record)`` gives a Kafka record's
    row in ``columns`` order, or raises Skip; ``counter`` counts stored and skipped records
    (label outcome)."""

    def __init__(self, settings: Settings, pause: Pause, *, what: str, topic: str, group: str, table: str,
                 columns: tuple[str, ...], row: Callable[[Any], list], counter: Counter, **consumer: Any):
        """``pause``: between retries; raises GaveUp once the sink is stopping. ``consumer``:
        more settings of the topic's consumer."""
        self.settings = settings
        self.what, self.topic, self.table, self.columns = what, topic, table, columns
        self._row, self._counter, self._pause = row, counter, pause
        self.consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, group_id=group,
                                         enable_auto_commit=False, auto_offset_reset="earliest",
                                         metadata_max_age_ms=5000,  # see processors/app.py: a broker restart
                                         **consumer)
        self.client: Client | None = None

    async def run(self, stop: asyncio.Event) -> None:
        self.client = await asyncio.to_thread(connect, self.settings.clickhouse_url)  # a client of its own
        try:
            await self.consumer.start()
            self.consumer.subscribe([self.topic])
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
                rows.append(self._row(rec))
            except Skip as exc:
                if exc.logged:
                    log.warning(f"{self.what} skipped a record it cannot store",
                                extra={"partition": rec.partition, "offset": rec.offset, "error": str(exc)[:200]})
                self._counter.labels("invalid_skipped").inc()
        if rows:
            token = f"{tp.topic}/{tp.partition}/{records[0].offset}-{records[-1].offset}"
            await retry(lambda: asyncio.to_thread(self._insert, rows, token), f"clickhouse insert of {self.what}",
                        on=Exception, max_s=INSERT_RETRY_MAX_S, pause=self._pause, logger=log)
            self._counter.labels("stored").inc(len(rows))
        try:
            await retry(lambda: self.consumer.commit({tp: records[-1].offset + 1}), f"{self.what} offset commit",
                        on=KafkaError, unless=lambda exc: isinstance(exc, REFUSED), pause=self._pause, logger=log)
        except REFUSED as exc:  # the partition went elsewhere: its next owner stores the same rows again
            log.warning(f"{self.what} commit refused after a rebalance", extra={"error": str(exc)})

    def _insert(self, rows: list[list], token: str) -> None:
        self.client.insert(self.table, rows, column_names=list(self.columns),
                           settings={"insert_deduplicate": 1, "insert_deduplication_token": token})
