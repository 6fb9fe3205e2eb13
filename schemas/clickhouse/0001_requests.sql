-- Raw request events, one row per valid event.
-- Ordered by org then time: the shape of every dashboard and analyst query.
CREATE TABLE IF NOT EXISTS requests
(
    event_id        UUID,
    event_time      DateTime64(3, 'UTC'),
    org_id          LowCardinality(String),
    api_key_id      LowCardinality(String),
    service         LowCardinality(String),
    endpoint        LowCardinality(String),
    method          LowCardinality(String),
    status          UInt16,
    latency_ms      Float32,
    request_bytes   UInt64,
    response_bytes  UInt64,
    client_ip       IPv6,
    user_agent      String CODEC(ZSTD(3)),
    schema_version  UInt8,
    -- Where the row came from: makes every stored row traceable to its record.
    kafka_partition UInt32,
    kafka_offset    UInt64,
    inserted_at     DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = MergeTree
PARTITION BY toYYYYMMDD(event_time)
ORDER BY (org_id, event_time, api_key_id)
TTL toDateTime(event_time) + INTERVAL 30 DAY
SETTINGS non_replicated_deduplication_window = 1000, ttl_only_drop_parts = 1;
