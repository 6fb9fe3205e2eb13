-- Org-level rollups per minute, hour and day: by org and tier only. Questions about an
-- org as a whole (totals, volume and latency series, org ranking, usage per tier) read
-- a few rows per bucket here instead of one per API key x endpoint x method x status
-- in requests_1m/1h/1d; merging latency states is what costs, and there are far fewer.
CREATE TABLE IF NOT EXISTS requests_org_1m
(
    bucket          DateTime('UTC'),
    org_id          LowCardinality(String),
    tier            LowCardinality(String),
    requests        SimpleAggregateFunction(sum, UInt64),
    errors          SimpleAggregateFunction(sum, UInt64),
    denials         SimpleAggregateFunction(sum, UInt64),
    request_bytes   SimpleAggregateFunction(sum, UInt64),
    response_bytes  SimpleAggregateFunction(sum, UInt64),
    latency_ms      AggregateFunction(quantilesTDigest(0.5, 0.95, 0.99), Float32)
)
ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMMDD(bucket)
ORDER BY (org_id, bucket, tier)
TTL bucket + INTERVAL 90 DAY
SETTINGS non_replicated_deduplication_window = 1000, ttl_only_drop_parts = 1;

CREATE TABLE IF NOT EXISTS requests_org_1h
(
    bucket          DateTime('UTC'),
    org_id          LowCardinality(String),
    tier            LowCardinality(String),
    requests        SimpleAggregateFunction(sum, UInt64),
    errors          SimpleAggregateFunction(sum, UInt64),
    denials         SimpleAggregateFunction(sum, UInt64),
    request_bytes   SimpleAggregateFunction(sum, UInt64),
    response_bytes  SimpleAggregateFunction(sum, UInt64),
    latency_ms      AggregateFunction(quantilesTDigest(0.5, 0.95, 0.99), Float32)
)
ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMM(bucket)
ORDER BY (org_id, bucket, tier)
TTL bucket + INTERVAL 365 DAY
SETTINGS non_replicated_deduplication_window = 1000;

CREATE TABLE IF NOT EXISTS requests_org_1d
(
    bucket          DateTime('UTC'),
    org_id          LowCardinality(String),
    tier            LowCardinality(String),
    requests        SimpleAggregateFunction(sum, UInt64),
    errors          SimpleAggregateFunction(sum, UInt64),
    denials         SimpleAggregateFunction(sum, UInt64),
    request_bytes   SimpleAggregateFunction(sum, UInt64),
    response_bytes  SimpleAggregateFunction(sum, UInt64),
    latency_ms      AggregateFunction(quantilesTDigest(0.5, 0.95, 0.99), Float32)
)
ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMM(bucket)
ORDER BY (org_id, bucket, tier)
TTL bucket + INTERVAL 1095 DAY
SETTINGS non_replicated_deduplication_window = 1000;

-- Rows stored before this migration, rolled up once (see 0002 on the order and the tokens).
INSERT INTO requests_org_1m SETTINGS insert_deduplication_token = '0003_org_rollups:requests_org_1m'
SELECT toStartOfMinute(toDateTime(event_time)) AS bucket, org_id, tier, count() AS requests,
       countIf(status >= 500) AS errors, countIf(status = 429) AS denials, sum(request_bytes) AS request_bytes,
       sum(response_bytes) AS response_bytes, quantilesTDigestState(0.5, 0.95, 0.99)(latency_ms) AS latency_ms
FROM requests
GROUP BY bucket, org_id, tier;

INSERT INTO requests_org_1h SETTINGS insert_deduplication_token = '0003_org_rollups:requests_org_1h'
SELECT toStartOfHour(toDateTime(event_time)) AS bucket, org_id, tier, count() AS requests,
       countIf(status >= 500) AS errors, countIf(status = 429) AS denials, sum(request_bytes) AS request_bytes,
       sum(response_bytes) AS response_bytes, quantilesTDigestState(0.5, 0.95, 0.99)(latency_ms) AS latency_ms
FROM requests
GROUP BY bucket, org_id, tier;

INSERT INTO requests_org_1d SETTINGS insert_deduplication_token = '0003_org_rollups:requests_org_1d'
SELECT toStartOfDay(toDateTime(event_time)) AS bucket, org_id, tier, count() AS requests,
       countIf(status >= 500) AS errors, countIf(status = 429) AS denials, sum(request_bytes) AS request_bytes,
       sum(response_bytes) AS response_bytes, quantilesTDigestState(0.5, 0.95, 0.99)(latency_ms) AS latency_ms
FROM requests
GROUP BY bucket, org_id, tier;

CREATE MATERIALIZED VIEW IF NOT EXISTS requests_org_1m_mv TO requests_org_1m AS
SELECT toStartOfMinute(toDateTime(event_time)) AS bucket, org_id, tier, count() AS requests,
       countIf(status >= 500) AS errors, countIf(status = 429) AS denials, sum(request_bytes) AS request_bytes,
       sum(response_bytes) AS response_bytes, quantilesTDigestState(0.5, 0.95, 0.99)(latency_ms) AS latency_ms
FROM requests
GROUP BY bucket, org_id, tier;

CREATE MATERIALIZED VIEW IF NOT EXISTS requests_org_1h_mv TO requests_org_1h AS
SELECT toStartOfHour(toDateTime(event_time)) AS bucket, org_id, tier, count() AS requests,
       countIf(status >= 500) AS errors, countIf(status = 429) AS denials, sum(request_bytes) AS request_bytes,
       sum(response_bytes) AS response_bytes, quantilesTDigestState(0.5, 0.95, 0.99)(latency_ms) AS latency_ms
FROM requests
GROUP BY bucket, org_id, tier;

CREATE MATERIALIZED VIEW IF NOT EXISTS requests_org_1d_mv TO requests_org_1d AS
SELECT toStartOfDay(toDateTime(event_time)) AS bucket, org_id, tier, count() AS requests,
       countIf(status >= 500) AS errors, countIf(status = 429) AS denials, sum(request_bytes) AS request_bytes,
       sum(response_bytes) AS response_bytes, quantilesTDigestState(0.5, 0.95, 0.99)(latency_ms) AS latency_ms
FROM requests
GROUP BY bucket, org_id, tier;
