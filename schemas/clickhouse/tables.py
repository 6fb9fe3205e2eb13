"""Names of the ClickHouse tables and what each one keeps: the contract between the sink
(which writes), the query API (which reads) and the migrations (which create them).
The DDL itself lives in schemas/clickhouse/NNNN_*.sql."""

from __future__ import annotations

from dataclasses import dataclass

RAW = "requests"
# What the sink inserts into: a Null table whose view passes the rows on to RAW (see
# schemas/clickhouse/0004_ingest.sql for why), with the columns of RAW_COLUMNS.
INGEST = "requests_ingest"
# Where rows the raw table lacks after a retried batch are staged before being attached
# to it (sinks/clickhouse/repair.py); created and dropped by each repair.
REPAIR_STAGE = "requests_repair"

# Columns the sink writes into RAW, in this order (inserted_at is filled in by ClickHouse).
RAW_COLUMNS = (
    "event_id", "event_time", "org_id", "api_key_id", "service", "endpoint", "method", "status",
    "latency_ms", "request_bytes", "response_bytes", "client_ip", "user_agent", "schema_version",
    "kafka_partition", "kafka_offset", "tier",
)

# The API key registry's audit trail (schemas/clickhouse/0005_api_key_changes.sql): a row per
# change of a key, written by the sink from the keys topic; the view adds what each changed.
KEY_CHANGES = "api_key_changes"
KEY_AUDIT = "api_key_audit"
KEY_CHANGES_COLUMNS = (
    "org_id", "key_id", "version", "change", "actor", "changed_at", "name", "env", "display_prefix", "secret_id",
    "scopes", "limits", "expires_at", "state", "created_at", "rotated_from", "rotated_to", "kafka_partition",
    "kafka_offset",
)

# The alert history (schemas/clickhouse/0006_alert_history.sql): a row per transition and per
# delivery attempt, written by the sink from the alert history topic.
ALERT_HISTORY = "alert_history"
ALERT_HISTORY_COLUMNS = (
    "row_id", "record", "at", "org_id", "api_key_id", "fingerprint", "rule_org_id", "rule_id", "rule_type", "severity",
    "kind", "episode", "from_status", "to_status", "value", "threshold", "notification_id", "muted", "channel",
    "attempt", "outcome", "error", "kafka_partition", "kafka_offset",
)

# Rollups keep, per time bucket and their dimensions: requests, errors (status >= 500),
# request/response bytes and the latency as counts per latency bucket (latency.py), from
# which these quantiles are read.
LATENCY_QUANTILES = (0.5, 0.95, 0.99)
ERROR_MIN_STATUS = 500  # "errors" are server errors; 4xx (and 429 denials) are reported by status class/code
DENIAL_STATUS = 429  # a request refused by rate limiting


@dataclass(frozen=True, slots=True)
class Table:
    name: str
    time_column: str  # what the TTL and every time filter apply to
    ttl_expr: str  # the DateTime expression the TTL adds the retention to
    grain_ms: int  # bucket size of a rollup; 0 for the raw table
    retention_setting: str  # Settings attribute holding the retention in days


MINUTE_MS = 60_000
HOUR_MS = 3_600_000
DAY_MS = 86_400_000

RAW_TABLE = Table(RAW, "event_time", "toDateTime(event_time)", 0, "retention_raw_days")
# By org, tier, API key, endpoint, method and status code (finest first).
ROLLUPS = (
    Table("requests_1m", "bucket", "bucket", MINUTE_MS, "retention_minute_days"),
    Table("requests_1h", "bucket", "bucket", HOUR_MS, "retention_hour_days"),
    Table("requests_1d", "bucket", "bucket", DAY_MS, "retention_day_days"),
)
# By org and tier only, with a denials column: questions about an org as a whole read
# these, far fewer rows (and latency states to merge) than ROLLUPS.
ORG_ROLLUPS = (
    Table("requests_org_1m", "bucket", "bucket", MINUTE_MS, "retention_minute_days"),
    Table("requests_org_1h", "bucket", "bucket", HOUR_MS, "retention_hour_days"),
    Table("requests_org_1d", "bucket", "bucket", DAY_MS, "retention_day_days"),
)
ORG_ROLLUP_OF = {wide.name: org for wide, org in zip(ROLLUPS, ORG_ROLLUPS, strict=True)}  # same grain
# By org, endpoint and method (schemas/clickhouse/0009_endpoint_rollups.sql): requests,
# errors, bytes and latency per endpoint, for questions without an API key filter.
ENDPOINT_ROLLUPS = (
    Table("requests_endpoint_1m", "bucket", "bucket", MINUTE_MS, "retention_minute_days"),
    Table("requests_endpoint_1h", "bucket", "bucket", HOUR_MS, "retention_hour_days"),
    Table("requests_endpoint_1d", "bucket", "bucket", DAY_MS, "retention_day_days"),
)
ENDPOINT_ROLLUP_OF = {wide.name: ep for wide, ep in zip(ROLLUPS, ENDPOINT_ROLLUPS, strict=True)}  # same grain
# By org and status code, and by org and API key (schemas/clickhouse/0011): request counts and
# bytes only (no latency state), per hour and day, for the questions that count requests by
# status or by key. No minute grain: a wide rollup without one of these reads its own rows.
STATUS_ROLLUPS = (
    Table("requests_status_1h", "bucket", "bucket", HOUR_MS, "retention_hour_days"),
    Table("requests_status_1d", "bucket", "bucket", DAY_MS, "retention_day_days"),
)
STATUS_ROLLUP_OF = {wide.name: s for wide, s in zip(ROLLUPS[1:], STATUS_ROLLUPS, strict=True)}  # same grain
KEY_ROLLUPS = (
    Table("requests_key_1h", "bucket", "bucket", HOUR_MS, "retention_hour_days"),
    Table("requests_key_1d", "bucket", "bucket", DAY_MS, "retention_day_days"),
)
KEY_ROLLUP_OF = {wide.name: k for wide, k in zip(ROLLUPS[1:], KEY_ROLLUPS, strict=True)}  # same grain
LATENCY_ROLLUPS = (*ROLLUPS, *ORG_ROLLUPS, *ENDPOINT_ROLLUPS)  # the rollups with a latency state
DENIALS_ROLLUPS = (*ORG_ROLLUPS, *KEY_ROLLUPS)  # the rollups with a denials column instead of a status one
ALL_ROLLUPS = (*LATENCY_ROLLUPS, *STATUS_ROLLUPS, *KEY_ROLLUPS)  # every table the views fill from RAW
TABLES = (RAW_TABLE, *ALL_ROLLUPS)


def view_of(rollup: Table) -> str:
    """The materialized view that fills a rollup from RAW (the migrations name them so)."""
    return f"{rollup.name}_mv"
