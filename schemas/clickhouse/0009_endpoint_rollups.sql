-- Endpoint-level rollups per minute, hour and day: by org, endpoint and method. The endpoints
-- question (requests, errors and latency per endpoint; bytes too, which the sink's repair
-- compares with the raw table) reads these when no API key filter is
-- given: one row per endpoint and method a bucket instead of one per API key x endpoint x
-- method x status code in requests_1m/1h/1d (~50 times fewer rows on the benchmark's data).
-- Worth it now that a latency state merges in bounded size (0007): with t-digest states the
-- fewer rows each carried about as many centroids as the many rows they replaced.
-- Rows stored before this migration are rolled up from the API-key-level rollups of the
-- same grain (not from the raw table, which keeps less): their sums and bucket counts merge
-- exactly. Run before the views exist; the tokens make a retry after a failed migration
-- drop the blocks that had already landed. Granules of 1024 rows (not 8192): a state is read
-- whole granule by granule, and a day of one org's endpoints is a few hundred rows here.

CREATE TABLE IF NOT EXISTS requests_endpoint_1m
(
    bucket          DateTime('UTC'),
    org_id          LowCardinality(String),
    endpoint        LowCardinality(String),
    method          LowCardinality(String),
    requests        SimpleAggregateFunction(sum, UInt64),
    errors          SimpleAggregateFunction(sum, UInt64),
    request_bytes   SimpleAggregateFunction(sum, UInt64),
    response_bytes  SimpleAggregateFunction(sum, UInt64),
    latency_hist    AggregateFunction(quantilesExactWeighted(0.5, 0.95, 0.99), UInt16, UInt64)
)
ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMMDD(bucket)
ORDER BY (org_id, bucket, endpoint, method)
TTL bucket + INTERVAL 90 DAY
SETTINGS non_replicated_deduplication_window = 1000, ttl_only_drop_parts = 1, index_granularity = 1024;

CREATE TABLE IF NOT EXISTS requests_endpoint_1h
(
    bucket          DateTime('UTC'),
    org_id          LowCardinality(String),
    endpoint        LowCardinality(String),
    method          LowCardinality(String),
    requests        SimpleAggregateFunction(sum, UInt64),
    errors          SimpleAggregateFunction(sum, UInt64),
    request_bytes   SimpleAggregateFunction(sum, UInt64),
    response_bytes  SimpleAggregateFunction(sum, UInt64),
    latency_hist    AggregateFunction(quantilesExactWeighted(0.5, 0.95, 0.99), UInt16, UInt64)
)
ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMM(bucket)
ORDER BY (org_id, bucket, endpoint, method)
TTL bucket + INTERVAL 365 DAY
SETTINGS non_replicated_deduplication_window = 1000, index_granularity = 1024;

CREATE TABLE IF NOT EXISTS requests_endpoint_1d
(
    bucket          DateTime('UTC'),
    org_id          LowCardinality(String),
    endpoint        LowCardinality(String),
    method          LowCardinality(String),
    requests        SimpleAggregateFunction(sum, UInt64),
    errors          SimpleAggregateFunction(sum, UInt64),
    request_bytes   SimpleAggregateFunction(sum, UInt64),
    response_bytes  SimpleAggregateFunction(sum, UInt64),
    latency_hist    AggregateFunction(quantilesExactWeighted(0.5, 0.95, 0.99), UInt16, UInt64)
)
ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMM(bucket)
ORDER BY (org_id, bucket, endpoint, method)
TTL bucket + INTERVAL 1095 DAY
SETTINGS non_replicated_deduplication_window = 1000, index_granularity = 1024;

INSERT INTO requests_endpoint_1m SETTINGS insert_deduplication_token = '0009_endpoint_rollups:requests_endpoint_1m'
SELECT bucket, org_id, endpoint, method, sum(requests) AS requests, sum(errors) AS errors,
       sum(request_bytes) AS request_bytes, sum(response_bytes) AS response_bytes,
       quantilesExactWeightedMergeState(0.5, 0.95, 0.99)(latency_hist) AS latency_hist
FROM requests_1m
GROUP BY bucket, org_id, endpoint, method;

INSERT INTO requests_endpoint_1h SETTINGS insert_deduplication_token = '0009_endpoint_rollups:requests_endpoint_1h'
SELECT bucket, org_id, endpoint, method, sum(requests) AS requests, sum(errors) AS errors,
       sum(request_bytes) AS request_bytes, sum(response_bytes) AS response_bytes,
       quantilesExactWeightedMergeState(0.5, 0.95, 0.99)(latency_hist) AS latency_hist
FROM requests_1h
GROUP BY bucket, org_id, endpoint, method;

INSERT INTO requests_endpoint_1d SETTINGS insert_deduplication_token = '0009_endpoint_rollups:requests_endpoint_1d'
SELECT bucket, org_id, endpoint, method, sum(requests) AS requests, sum(errors) AS errors,
       sum(request_bytes) AS request_bytes, sum(response_bytes) AS response_bytes,
       quantilesExactWeightedMergeState(0.5, 0.95, 0.99)(latency_hist) AS latency_hist
FROM requests_1d
GROUP BY bucket, org_id, endpoint, method;

CREATE MATERIALIZED VIEW IF NOT EXISTS requests_endpoint_1m_mv TO requests_endpoint_1m AS
SELECT toStartOfMinute(toDateTime(event_time)) AS bucket, org_id, endpoint, method, count() AS requests,
       countIf(status >= 500) AS errors, sum(request_bytes) AS request_bytes, sum(response_bytes) AS response_bytes,
       quantilesExactWeightedState(0.5, 0.95, 0.99)(if(NOT (latency_ms >= 0.1), toUInt16(0), toUInt16(least(1 + floor(log2(latency_ms / 0.1) * 16), 475))), toUInt64(1)) AS latency_hist
FROM requests
GROUP BY bucket, org_id, endpoint, method;

CREATE MATERIALIZED VIEW IF NOT EXISTS requests_endpoint_1h_mv TO requests_endpoint_1h AS
SELECT toStartOfHour(toDateTime(event_time)) AS bucket, org_id, endpoint, method, count() AS requests,
       countIf(status >= 500) AS errors, sum(request_bytes) AS request_bytes, sum(response_bytes) AS response_bytes,
       quantilesExactWeightedState(0.5, 0.95, 0.99)(if(NOT (latency_ms >= 0.1), toUInt16(0), toUInt16(least(1 + floor(log2(latency_ms / 0.1) * 16), 475))), toUInt64(1)) AS latency_hist
FROM requests
GROUP BY bucket, org_id, endpoint, method;

CREATE MATERIALIZED VIEW IF NOT EXISTS requests_endpoint_1d_mv TO requests_endpoint_1d AS
SELECT toStartOfDay(toDateTime(event_time)) AS bucket, org_id, endpoint, method, count() AS requests,
       countIf(status >= 500) AS errors, sum(request_bytes) AS request_bytes, sum(response_bytes) AS response_bytes,
       quantilesExactWeightedState(0.5, 0.95, 0.99)(if(NOT (latency_ms >= 0.1), toUInt16(0), toUInt16(least(1 + floor(log2(latency_ms / 0.1) * 16), 475))), toUInt64(1)) AS latency_hist
FROM requests
GROUP BY bucket, org_id, endpoint, method;
