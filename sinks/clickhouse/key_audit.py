"""The API key registry's audit trail: every record of the keys topic (a change of a key:
create, update, revoke, rotate) as a row of api_key_changes (schemas/clickhouse/0005),
in the sink since the embedded engine can be open in one process only.

Exactly once by (key, version): the table is a ReplacingMergeTree on those, so a record
stored again (the sink restarted between an insert and its commit, or a rebalance) is the
same row; each insert also carries a token of its offset range, so a range inserted again
as it was is dropped at once. Its own consumer group (SINK_KEYS_GROUP): the events'
batches, plans and rebalances are none of its business, nor it theirs.

Rows hold who, when, and the key as the change left it: never the key, nor its hash.
Records that are not a key's record are skipped and counted: the processor's
materializer dead-letters them (schemas/key_records.py), so each is dead-lettered once.
ClickHouse or the broker failing: the batch is retried until it is stored, never skipped.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime, timezone

from aiokafka import AIOKafkaConsumer
from aiokafka.errors import KafkaError
from clickhouse_connect.driver.client import Client
from prometheus_client import Counter

from quotaflow.core.retry import GaveUp, Pause, retry
from quotaflow.core.settings import Settings
from quotaflow.schemas import key_records
from quotaflow.schemas.api_keys import KeyRecord
from quotaflow.schemas.clickhouse.client import connect
from quotaflow.schemas.clickhouse.tables import KEY_CHANGES, KEY_CHANGES_COLUMNS
from quotaflow.schemas.topics import KEYS_TOPIC, SINK_KEYS_GROUP
from quotaflow.sinks.clickhouse.inserts import INSERT_RETRY_MAX_S
from quotaflow.sinks.clickhouse.kafka_side import REFUSED

log = logging.getLogger(__name__)

CHANGES = Counter("quotaflow_sink_key_changes_total",
                  "Records of the keys topic taken by the sink's audit, by outcome (stored, invalid_skipped)",
                  ["outcome"])


def _time(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc)


def row(rec: KeyRecord, partition: int, offset: int) -> list:
    """A change as the audit keeps it, in KEY_CHANGES_COLUMNS order: no hash, no key."""
    return [rec.org_id, rec.key_id, rec.version, rec.change, rec.actor, _time(rec.updated_ms), rec.name, rec.env,
            rec.display_prefix, rec.secret_id, list(rec.scopes), dict(rec.limits),
            None if rec.expires_ms is None else _time(rec.expires_ms), rec.state, _time(rec.created_ms),
            rec.rotated_from or "", rec.rotated_to or "", partition, offset]


class KeyAudit:
    def __init__(self, settings: Settings, pause: Pause):
        """``pause``: between retries; raises GaveUp once the sink is stopping."""
        self.settings = settings
        self._pause = pause
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=settings.kafka_bootstrap,
            group_id=SINK_KEYS_GROUP,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            isolation_level="read_committed",
            metadata_max_age_ms=5000,  # see processors/app.py: recover quickly from a broker restart
        )
        self.client: Client | None = None

    async def run(self, stop: asyncio.Event) -> None:
        """Store the changes until ``stop`` is set."""
        self.client = await asyncio.to_thread(connect, self.settings.clickhouse_url)  # a client of its own
        try:
            await self.consumer.start()
            self.consumer.subscribe([KEYS_TOPIC])
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
                rows.append(row(key_records.decode(rec.key, rec.value), rec.partition, rec.offset))
            except key_records.InvalidRecord:
                CHANGES.labels("invalid_skipped").inc()
            except (ValueError, OverflowError) as exc:  # checked records convert; never stop the audit for one
                log.warning("key audit skipped a record it cannot store",
                            extra={"partition": rec.partition, "offset": rec.offset, "error": str(exc)[:200]})
                CHANGES.labels("invalid_skipped").inc()
        if rows:
            token = f"{tp.topic}/{tp.partition}/{records[0].offset}-{records[-1].offset}"
            await retry(lambda: asyncio.to_thread(self._insert, rows, token), "clickhouse insert of key changes",
                        on=Exception, max_s=INSERT_RETRY_MAX_S, pause=self._pause, logger=log)
            CHANGES.labels("stored").inc(len(rows))
        try:
            await retry(lambda: self.consumer.commit({tp: records[-1].offset + 1}), "key audit offset commit",
                        on=KafkaError, unless=lambda exc: isinstance(exc, REFUSED), pause=self._pause, logger=log)
        except REFUSED as exc:  # the partition went elsewhere: its next owner stores the rows again, the same rows
            log.warning("key audit commit refused after a rebalance", extra={"error": str(exc)})

    def _insert(self, rows: list[list], token: str) -> None:
        self.client.insert(KEY_CHANGES, rows, column_names=list(KEY_CHANGES_COLUMNS),
                           settings={"insert_deduplicate": 1, "insert_deduplication_token": token})
