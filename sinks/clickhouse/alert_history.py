"""The alert history: every record of the alert history topic (a transition of an alert,
a delivery attempt: schemas/alert_history.py) as a row of alert_history
(schemas/clickhouse/0006), by the sink's TopicTable (topic_table.py: exactly once,
retried, never skipped for a failure). The alerts stage writes the records; this stores them.

Exactly once by row id: the table is a ReplacingMergeTree on (org, row id), so a record
written again (the alerts stage replayed a step) is the same row too. Its own consumer
group (SINK_ALERTS_GROUP). Records that do not parse are skipped, counted and logged.
"""

from __future__ import annotations

from datetime import datetime, timezone

import msgspec
from prometheus_client import Counter

from quotaflow.core.retry import Pause
from quotaflow.core.settings import Settings
from quotaflow.schemas.alert_history import HistoryRecord
from quotaflow.schemas.clickhouse.tables import ALERT_HISTORY, ALERT_HISTORY_COLUMNS
from quotaflow.schemas.topics import ALERT_HISTORY_TOPIC, SINK_ALERTS_GROUP
from quotaflow.sinks.clickhouse.topic_table import Skip, TopicTable

RECORDS = Counter("quotaflow_sink_alert_history_total",
                  "Records of the alert history topic taken by the sink, by outcome (stored, invalid_skipped)",
                  ["outcome"])


def row(rec: HistoryRecord, partition: int, offset: int) -> list:
    """A record as the table keeps it, in ALERT_HISTORY_COLUMNS order."""
    return [rec.row_id, rec.record, datetime.fromtimestamp(rec.at_ms / 1000, tz=timezone.utc), rec.org_id,
            rec.api_key_id or "", rec.fingerprint, rec.rule_org_id, rec.rule_id, rec.rule_type, rec.severity, rec.kind,
            rec.episode, rec.from_status, rec.to_status, rec.value, rec.threshold, rec.notification_id, rec.muted,
            rec.channel, rec.attempt, rec.outcome, rec.error, partition, offset]


def _row_of(rec) -> list:
    try:
        return row(HistoryRecord.decode(rec.value or b""), rec.partition, rec.offset)
    except (msgspec.DecodeError, msgspec.ValidationError, ValueError, OverflowError, OSError) as exc:
        raise Skip(str(exc)) from None


def alert_history(settings: Settings, pause: Pause) -> TopicTable:
    return TopicTable(settings, pause, what="alert history", topic=ALERT_HISTORY_TOPIC, group=SINK_ALERTS_GROUP,
                      table=ALERT_HISTORY, columns=ALERT_HISTORY_COLUMNS, row=_row_of, counter=RECORDS)
