-- Status-level and key-level rollups per hour and day, without endpoint, method or latency: the
-- questions that count requests by status code (the status-class series, the status breakdown)
-- or by API key (the key ranking, denials) read these instead of requests_1h/1d, which hold one
-- row per API key x endpoint x method x status code x tier. Asked about every org, those
-- questions were the dashboard's slowest after the endpoints one: on the benchmark's 10M events,
-- 24 hours of requests_1h are ~233k rows, of requests_status_1h ~19k, of requests_key_1h ~17k;
-- 30 days of requests_1d ~1.7M rows, of these ~24k and ~21k. No latency state: none of these
-- questions asks for latency, and a row without one is cheap to store and merge.
-- No minute grain: the 1h timeframe reads an hour of requests_1m, few rows already.
--
-- requests_status_*: by org and status code (an API key or endpoint filter reads the wide rollup).
-- requests_key_*: by org and API key, with a denials column (429s) as the org rollups have (an
-- endpoint filter reads the wide rollup). Both keep bytes, which the sink's repair compares with
-- the raw table's.
--
-- Filled from the API-key-level rollup of the same grain (whose sums merge exactly into these),
-- as 0009 filled the endpoint rollups: before the views exist, with tokens that make a retry
-- after a failed migration drop the blocks that had already landed; the sink applies
-- migrations before it consumes. Granules of 256
-- rows: a day of one org is 24 x a few status codes or keys here. `quotaflow db migrate` (and
-- the sink at start) sets the TTLs from the retention settings again (retention.py).

CREATE TABLE IF NOT EXISTS requests_status_1h
(
    bucket          DateTime('UTC'),
    org_id          LowCardinality(String),
    status          UInt16,
    requests        SimpleAggregateFunction(sum, UInt64),
    errors          SimpleAggregateFunction(sum, UInt64),
    request_bytes   SimpleAggregateFunction(sum, UInt64),
    response_bytes  SimpleAggregateFunction(sum, UInt64)
)
ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMM(bucket)
ORDER BY (org_id, bucket, status)
TTL bucket + INTERVAL 365 DAY
SETTINGS non_replicated_deduplication_window = 1000, index_granularity = 256;

INSERT INTO requests_status_1h SETTINGS insert_deduplication_token = '0011_status_and_key_rollups:requests_status_1h'
SELECT bucket, org_id, status, sum(requests), sum(errors), sum(request_bytes), sum(response_bytes)
FROM requests_1h
GROUP BY bucket, org_id, status;

CREATE MATERIALIZED VIEW IF NOT EXISTS requests_status_1h_mv TO requests_status_1h AS
SELECT toStartOfHour(toDateTime(event_time)) AS bucket, org_id, status, count() AS requests, countIf(status >= 500) AS errors,
       sum(request_bytes) AS request_bytes, sum(response_bytes) AS response_bytes
FROM requests
GROUP BY bucket, org_id, status;

CREATE TABLE IF NOT EXISTS requests_key_1h
(
    bucket          DateTime('UTC'),
    org_id          LowCardinality(String),
    api_key_id      LowCardinality(String),
    requests        SimpleAggregateFunction(sum, UInt64),
    errors          SimpleAggregateFunction(sum, UInt64),
    denials         SimpleAggregateFunction(sum, UInt64),
    request_bytes   SimpleAggregateFunction(sum, UInt64),
    response_bytes  SimpleAggregateFunction(sum, UInt64)
)
ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMM(bucket)
ORDER BY (org_id, bucket, api_key_id)
TTL bucket + INTERVAL 365 DAY
SETTINGS non_replicated_deduplication_window = 1000, index_granularity = 256;

INSERT INTO requests_key_1h SETTINGS insert_deduplication_token = '0011_status_and_key_rollups:requests_key_1h'
SELECT bucket, org_id, api_key_id, sum(requests), sum(errors), sumIf(requests, status = 429), sum(request_bytes),
       sum(response_bytes)
FROM requests_1h
GROUP BY bucket, org_id, api_key_id;

CREATE MATERIALIZED VIEW IF NOT EXISTS requests_key_1h_mv TO requests_key_1h AS
SELECT toStartOfHour(toDateTime(event_time)) AS bucket, org_id, api_key_id, count() AS requests, countIf(status >= 500) AS errors,
       countIf(status = 429) AS denials, sum(request_bytes) AS request_bytes, sum(response_bytes) AS response_bytes
FROM requests
GROUP BY bucket, org_id, api_key_id;

CREATE TABLE IF NOT EXISTS requests_status_1d
(
    bucket          DateTime('UTC'),
    org_id          LowCardinality(String),
    status          UInt16,
    requests        SimpleAggregateFunction(sum, UInt64),
    errors          SimpleAggregateFunction(sum, UInt64),
    request_bytes   SimpleAggregateFunction(sum, UInt64),
    response_bytes  SimpleAggregateFunction(sum, UInt64)
)
ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMM(bucket)
ORDER BY (org_id, bucket, status)
TTL bucket + INTERVAL 1095 DAY
SETTINGS non_replicated_deduplication_window = 1000, index_granularity = 256;

INSERT INTO requests_status_1d SETTINGS insert_deduplication_token = '0011_status_and_key_rollups:requests_status_1d'
SELECT bucket, org_id, status, sum(requests), sum(errors), sum(request_bytes), sum(response_bytes)
FROM requests_1d
GROUP BY bucket, org_id, status;

CREATE MATERIALIZED VIEW IF NOT EXISTS requests_status_1d_mv TO requests_status_1d AS
SELECT toStartOfDay(toDateTime(event_time)) AS bucket, org_id, status, count() AS requests, countIf(status >= 500) AS errors,
       sum(request_bytes) AS request_bytes, sum(response_bytes) AS response_bytes
FROM requests
GROUP BY bucket, org_id, status;

CREATE TABLE IF NOT EXISTS requests_key_1d
(
    bucket          DateTime('UTC'),
    org_id          LowCardinality(String),
    api_key_id      LowCardinality(String),
    requests        SimpleAggregateFunction(sum, UInt64),
    errors          SimpleAggregateFunction(sum, UInt64),
    denials         SimpleAggregateFunction(sum, UInt64),
    request_bytes   SimpleAggregateFunction(sum, UInt64),
    response_bytes  SimpleAggregateFunction(sum, UInt64)
)
ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMM(bucket)
ORDER BY (org_id, bucket, api_key_id)
TTL bucket + INTERVAL 1095 DAY
SETTINGS non_replicated_deduplication_window = 1000, index_granularity = 256;

INSERT INTO requests_key_1d SETTINGS insert_deduplication_token = '0011_status_and_key_rollups:requests_key_1d'
SELECT bucket, org_id, api_key_id, sum(requests), sum(errors), sumIf(requests, status = 429), sum(request_bytes),
       sum(response_bytes)
FROM requests_1d
GROUP BY bucket, org_id, api_key_id;

CREATE MATERIALIZED VIEW IF NOT EXISTS requests_key_1d_mv TO requests_key_1d AS
SELECT toStartOfDay(toDateTime(event_time)) AS bucket, org_id, api_key_id, count() AS requests, countIf(status >= 500) AS errors,
       countIf(status = 429) AS denials, sum(request_bytes) AS request_bytes, sum(response_bytes) AS response_bytes
FROM requests
GROUP BY bucket, org_id, api_key_id;
