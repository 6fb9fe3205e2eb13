-- The org's subscription tier when the event was stored (read by the sink from Redis);
-- '' for rows stored before this column existed.
ALTER TABLE requests ADD COLUMN IF NOT EXISTS tier LowCardinality(String) DEFAULT '';

-- Rollups per minute, hour and day by org, tier, API key, endpoint, method and status code.
-- Sums are SimpleAggregateFunction (merged by summing), latency is a t-digest state
-- (merged with quantilesTDigestMerge). The TTLs here are the defaults; `quotaflow db
-- migrate` sets them from the retention settings on every run.
-- non_replicated_deduplication_window: a block the sink retries with the same
-- insert_deduplication_token is dropped here as it is in the raw table.
CREATE TABLE IF NOT EXISTS requests_1m
(
    bucket          DateTime('UTC'),
    org_id          LowCardinality(String),
    tier            LowCardinality(String),
    api_key_id      LowCardinality(String),
    endpoint        LowCardinality(String),
    method          LowCardinality(String),
    status          UInt16,
    requests        SimpleAggregateFunction(sum, UInt64),
    errors          SimpleAggregateFunction(sum, UInt64),
    request_bytes   SimpleAggregateFunction(sum, UInt64),
    response_bytes  SimpleAggregateFunction(sum, UInt64),
    latency_ms      AggregateFunction(quantilesTDigest(0.5, 0.95, 0.99), Float32)
)
ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMMDD(bucket)
ORDER BY (org_id, bucket, api_key_id, endpoint, method, status, tier)
TTL bucket + INTERVAL 90 DAY
SETTINGS non_replicated_deduplication_window = 1000, ttl_only_drop_parts = 1;

CREATE TABLE IF NOT EXISTS requests_1h
(
    bucket          DateTime('UTC'),
    org_id          LowCardinality(String),
    tier            LowCardinality(String),
    api_key_id      LowCardinality(String),
    endpoint        LowCardinality(String),
    method          LowCardinality(String),
    status          UInt16,
    requests        SimpleAggregateFunction(sum, UInt64),
    errors          SimpleAggregateFunction(sum, UInt64),
    request_bytes   SimpleAggregateFunction(sum, UInt64),
    response_bytes  SimpleAggregateFunction(sum, UInt64),
    latency_ms      AggregateFunction(quantilesTDigest(0.5, 0.95, 0.99), Float32)
)
ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMM(bucket)
ORDER BY (org_id, bucket, api_key_id, endpoint, method, status, tier)
TTL bucket + INTERVAL 365 DAY
SETTINGS non_replicated_deduplication_window = 1000;

CREATE TABLE IF NOT EXISTS requests_1d
(
    bucket          DateTime('UTC'),
    org_id          LowCardinality(String),
    tier            LowCardinality(String),
    api_key_id      LowCardinality(String),
    endpoint        LowCardinality(String),
    method          LowCardinality(String),
    status          UInt16,
    requests        SimpleAggregateFunction(sum, UInt64),
    errors          SimpleAggregateFunction(sum, UInt64),
    request_bytes   SimpleAggregateFunction(sum, UInt64),
    response_bytes  SimpleAggregateFunction(sum, UInt64),
    latency_ms      AggregateFunction(quantilesTDigest(0.5, 0.95, 0.99), Float32)
)
ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMM(bucket)
ORDER BY (org_id, bucket, api_key_id, endpoint, method, status, tier)
TTL bucket + INTERVAL 1095 DAY
SETTINGS non_replicated_deduplication_window = 1000;

-- Rows stored before the rollups existed, rolled up once. Run before the views exist
-- (the sink applies migrations before it consumes); the token makes a retry after a
-- failed migration drop the blocks that had already landed.
INSERT INTO requests_1m SETTINGS insert_deduplication_token = '0002_tier_and_rollups:requests_1m'
SELECT toStartOfMinute(toDateTime(event_time)) AS bucket, org_id, tier, api_key_id, endpoint, method, status,
       count() AS requests, countIf(status >= 500) AS errors, sum(request_bytes) AS request_bytes,
       sum(response_bytes) AS response_bytes, quantilesTDigestState(0.5, 0.95, 0.99)(latency_ms) AS latency_ms
FROM requests
GROUP BY bucket, org_id, tier, api_key_id, endpoint, method, status;

INSERT INTO requests_1h SETTINGS insert_deduplication_token = '0002_tier_and_rollups:requests_1h'
SELECT toStartOfHour(toDateTime(event_time)) AS bucket, org_id, tier, api_key_id, endpoint, method, status,
       count() AS requests, countIf(status >= 500) AS errors, sum(request_bytes) AS request_bytes,
       sum(response_bytes) AS response_bytes, quantilesTDigestState(0.5, 0.95, 0.99)(latency_ms) AS latency_ms
FROM requests
GROUP BY bucket, org_id, tier, api_key_id, endpoint, method, status;

INSERT INTO requests_1d SETTINGS insert_deduplication_token = '0002_tier_and_rollups:requests_1d'
SELECT toStartOfDay(toDateTime(event_time)) AS bucket, org_id, tier, api_key_id, endpoint, method, status,
       count() AS requests, countIf(status >= 500) AS errors, sum(request_bytes) AS request_bytes,
       sum(response_bytes) AS response_bytes, quantilesTDigestState(0.5, 0.95, 0.99)(latency_ms) AS latency_ms
FROM requests
GROUP BY bucket, org_id, tier, api_key_id, endpoint, method, status;

-- Every block inserted into requests from now on is rolled up by these views.
CREATE MATERIALIZED VIEW IF NOT EXISTS requests_1m_mv TO requests_1m AS
SELECT toStartOfMinute(toDateTime(event_time)) AS bucket, org_id, tier, api_key_id, endpoint, method, status,
       count() AS requests, countIf(status >= 500) AS errors, sum(request_bytes) AS request_bytes,
       sum(response_bytes) AS response_bytes, quantilesTDigestState(0.5, 0.95, 0.99)(latency_ms) AS latency_ms
FROM requests
GROUP BY bucket, org_id, tier, api_key_id, endpoint, method, status;

CREATE MATERIALIZED VIEW IF NOT EXISTS requests_1h_mv TO requests_1h AS
SELECT toStartOfHour(toDateTime(event_time)) AS bucket, org_id, tier, api_key_id, endpoint, method, status,
       count() AS requests, countIf(status >= 500) AS errors, sum(request_bytes) AS request_bytes,
       sum(response_bytes) AS response_bytes, quantilesTDigestState(0.5, 0.95, 0.99)(latency_ms) AS latency_ms
FROM requests
GROUP BY bucket, org_id, tier, api_key_id, endpoint, method, status;

CREATE MATERIALIZED VIEW IF NOT EXISTS requests_1d_mv TO requests_1d AS
SELECT toStartOfDay(toDateTime(event_time)) AS bucket, org_id, tier, api_key_id, endpoint, method, status,
       count() AS requests, countIf(status >= 500) AS errors, sum(request_bytes) AS request_bytes,
       sum(response_bytes) AS response_bytes, quantilesTDigestState(0.5, 0.95, 0.99)(latency_ms) AS latency_ms
FROM requests
GROUP BY bucket, org_id, tier, api_key_id, endpoint, method, status;
