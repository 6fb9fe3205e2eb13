"""The API key registry's audit trail: every record of the keys topic (a change of a key:
create, update, revoke, rotate) as a row of api_key_changes (schemas/clickhouse/0005), by
the sink's TopicTable (topic_table.py: exactly once, retried, never skipped for a failure).

Exactly once by (key, version): the table is a ReplacingMergeTree on those. Its own consumer
group (SINK_KEYS_GROUP), reading committed records only. Rows hold who, when, and the key
as the change left it: never the key, nor its hash. Records that are not a key's record are
skipped and counted: the processor's materializer dead-letters them
(schemas/key_records.py), so each is dead-lettered once.
"""

from __future__ import annotations

from datetime import datetime, timezone

from prometheus_client import Counter

from quotaflow.core.retry import Pause
from quotaflow.core.settings import Settings
from quotaflow.schemas import key_records
from quotaflow.schemas.api_keys import KeyRecord
from quotaflow.schemas.clickhouse.tables import KEY_CHANGES, KEY_CHANGES_COLUMNS
from quotaflow.schemas.topics import KEYS_TOPIC, SINK_KEYS_GROUP
from quotaflow.sinks.clickhouse.topic_table import Skip, TopicTable

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


def _row_of(rec) -> list:
    try:
        return row(key_records.decode(rec.key, rec.value), rec.partition, rec.offset)
    except key_records.InvalidRecord as exc:  # dead-lettered by the materializer: not logged here again
        raise Skip(str(exc), logged=False) from None
    except (ValueError, OverflowError) as exc:  # checked records convert; never stop the audit for one
        raise Skip(str(exc)) from None


def key_audit(settings: Settings, pause: Pause) -> TopicTable:
    return TopicTable(settings, pause, what="key audit", topic=KEYS_TOPIC, group=SINK_KEYS_GROUP, table=KEY_CHANGES,
                      columns=KEY_CHANGES_COLUMNS, row=_row_of, counter=CHANGES, isolation_level="read_committed")
