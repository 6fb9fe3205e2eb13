-- The alert history: one row per transition of an alert (pending, cancelled, firing, repeat,
-- resolved) and per delivery attempt of a notification, written by the sink from the alert
-- history topic (schemas/alert_history.py). Never a channel's URL or secret: channels by name.
-- One row per row_id: a record written twice (the alerts stage or the sink restarted) is the
-- same row, merged away by ReplacingMergeTree; read it with FINAL (the query API does).
CREATE TABLE IF NOT EXISTS alert_history
(
    row_id          String,
    record          LowCardinality(String),
    at              DateTime64(3, 'UTC'),
    org_id          LowCardinality(String),
    api_key_id      String,
    fingerprint     String,
    rule_org_id     LowCardinality(String),
    rule_id         String,
    rule_type       LowCardinality(String),
    severity        LowCardinality(String),
    kind            LowCardinality(String),
    episode         UInt32,
    from_status     LowCardinality(String),
    to_status       LowCardinality(String),
    value           Nullable(Float64),
    threshold       Nullable(Float64),
    notification_id String,
    muted           Bool,
    channel         LowCardinality(String),
    attempt         UInt16,
    outcome         LowCardinality(String),
    error           String,
    kafka_partition UInt32,
    kafka_offset    UInt64,
    inserted_at     DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = ReplacingMergeTree(kafka_offset)
ORDER BY (org_id, row_id)
SETTINGS non_replicated_deduplication_window = 1000;
