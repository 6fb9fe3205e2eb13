"""The alert history: a record per transition of an alert (alerts/state.py) and per
delivery attempt of a notification, written by the alerts stage to ALERT_HISTORY_TOPIC
(schemas/topics.py) and stored by the sink in ClickHouse (migration 0006, table
alert_history), served by the query API at /v1/alerts.

``row_id`` names the row: a record written again (the alerts stage restarted between
writing its state and its history, a delivery attempt replayed) has the same id, and the
table keeps one row per id. Never a channel's URL or secret: channels by name, errors
as the delivery made them safe to show.
"""

from __future__ import annotations

from typing import Literal

import msgspec

TRANSITION, DELIVERY = "transition", "delivery"
RECORD_VERSION = 1


class HistoryRecord(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    record: Literal["transition", "delivery"]
    row_id: str
    at_ms: int
    org_id: str  # the org the alert is about
    fingerprint: str
    rule_org_id: str
    rule_id: str
    rule_type: str
    severity: str
    kind: str  # the transition's kind (pending, cancelled, firing, repeat, resolved); a delivery: its notification's
    episode: int = 0
    api_key_id: str | None = None
    from_status: str = ""
    to_status: str = ""
    value: float | None = None
    threshold: float | None = None
    notification_id: str = ""
    muted: bool = False
    channel: str = ""  # a delivery attempt's channel
    attempt: int = 0
    outcome: str = ""  # a delivery attempt: ok, retry, failed, dead_lettered
    error: str = ""
    version: int = RECORD_VERSION

    def encode(self) -> bytes:
        return msgspec.json.encode(self)

    @classmethod
    def decode(cls, data: bytes) -> "HistoryRecord":
        return msgspec.json.decode(data, type=cls)
