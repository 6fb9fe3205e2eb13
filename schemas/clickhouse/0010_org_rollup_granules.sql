-- Org-level rollups in granules of 64 rows (not 8192). ClickHouse reads and merges the latency
-- state of every row of a granule it reads, and an org's rows of a range are few here: a day
-- of one org is 24 rows of requests_org_1h, and a granule of 8192 rows held about a year of
-- it, or a dozen orgs' months, so the 24-hour questions about one org or about every org
-- (summary, latency series) read most of the table's states to use a few. The order stays
-- (org_id, bucket, tier): a tenant's question reads its own rows, however many orgs there
-- are; asked about every org, a range reads about two granules an org.
--
-- A table's granule size is fixed when it is created, so each org rollup is created again
-- and filled from the API-key-level rollup of the same grain (as 0009 filled the endpoint
-- rollups): the same events, kept as long (the same retention setting), whose sums, 429
-- counts and latency bucket counts merge exactly into the org's. Statements may run again
-- after a failed migration: the table is dropped and filled again whole. The sink applies
-- migrations before it consumes: no rows arrive meanwhile. (The INSERTs' columns go by position,
-- unnamed: an alias "requests" would turn sumIf(requests, ...) into an aggregate of an aggregate.) `quotaflow db migrate` (and the
-- sink at start) sets the TTLs from the retention settings again (retention.py).

DROP VIEW IF EXISTS requests_org_1m_mv;

DROP TABLE IF EXISTS requests_org_1m;

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
    latency_hist    AggregateFunction(quantilesExactWeighted(0.5, 0.95, 0.99), UInt16, UInt64)
)
ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMMDD(bucket)
ORDER BY (org_id, bucket, tier)
TTL bucket + INTERVAL 90 DAY
SETTINGS non_replicated_deduplication_window = 1000, ttl_only_drop_parts = 1, index_granularity = 64;

INSERT INTO requests_org_1m
SELECT bucket, org_id, tier, sum(requests), sum(errors), sumIf(requests, status = 429), sum(request_bytes),
       sum(response_bytes), quantilesExactWeightedMergeState(0.5, 0.95, 0.99)(latency_hist)
FROM requests_1m
GROUP BY bucket, org_id, tier;

CREATE MATERIALIZED VIEW IF NOT EXISTS requests_org_1m_mv TO requests_org_1m AS
SELECT toStartOfMinute(toDateTime(event_time)) AS bucket, org_id, tier, count() AS requests, countIf(status >= 500) AS errors, countIf(status = 429) AS denials, sum(request_bytes) AS request_bytes,
       sum(response_bytes) AS response_bytes,
       quantilesExactWeightedState(0.5, 0.95, 0.99)(if(NOT (latency_ms >= 0.1), toUInt16(0), toUInt16(least(1 + floor(log2(latency_ms / 0.1) * 16), 475))), toUInt64(1)) AS latency_hist
FROM requests
GROUP BY bucket, org_id, tier;

DROP VIEW IF EXISTS requests_org_1h_mv;

DROP TABLE IF EXISTS requests_org_1h;

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
    latency_hist    AggregateFunction(quantilesExactWeighted(0.5, 0.95, 0.99), UInt16, UInt64)
)
ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMM(bucket)
ORDER BY (org_id, bucket, tier)
TTL bucket + INTERVAL 365 DAY
SETTINGS non_replicated_deduplication_window = 1000, index_granularity = 64;

INSERT INTO requests_org_1h
SELECT bucket, org_id, tier, sum(requests), sum(errors), sumIf(requests, status = 429), sum(request_bytes),
       sum(response_bytes), quantilesExactWeightedMergeState(0.5, 0.95, 0.99)(latency_hist)
FROM requests_1h
GROUP BY bucket, org_id, tier;

CREATE MATERIALIZED VIEW IF NOT EXISTS requests_org_1h_mv TO requests_org_1h AS
SELECT toStartOfHour(toDateTime(event_time)) AS bucket, org_id, tier, count() AS requests, countIf(status >= 500) AS errors, countIf(status = 429) AS denials, sum(request_bytes) AS request_bytes,
       sum(response_bytes) AS response_bytes,
       quantilesExactWeightedState(0.5, 0.95, 0.99)(if(NOT (latency_ms >= 0.1), toUInt16(0), toUInt16(least(1 + floor(log2(latency_ms / 0.1) * 16), 475))), toUInt64(1)) AS latency_hist
FROM requests
GROUP BY bucket, org_id, tier;

DROP VIEW IF EXISTS requests_org_1d_mv;

DROP TABLE IF EXISTS requests_org_1d;

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
    latency_hist    AggregateFunction(quantilesExactWeighted(0.5, 0.95, 0.99), UInt16, UInt64)
)
ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMM(bucket)
ORDER BY (org_id, bucket, tier)
TTL bucket + INTERVAL 1095 DAY
SETTINGS non_replicated_deduplication_window = 1000, index_granularity = 64;

INSERT INTO requests_org_1d
SELECT bucket, org_id, tier, sum(requests), sum(errors), sumIf(requests, status = 429), sum(request_bytes),
       sum(response_bytes), quantilesExactWeightedMergeState(0.5, 0.95, 0.99)(latency_hist)
FROM requests_1d
GROUP BY bucket, org_id, tier;

CREATE MATERIALIZED VIEW IF NOT EXISTS requests_org_1d_mv TO requests_org_1d AS
SELECT toStartOfDay(toDateTime(event_time)) AS bucket, org_id, tier, count() AS requests, countIf(status >= 500) AS errors, countIf(status = 429) AS denials, sum(request_bytes) AS request_bytes,
       sum(response_bytes) AS response_bytes,
       quantilesExactWeightedState(0.5, 0.95, 0.99)(if(NOT (latency_ms >= 0.1), toUInt16(0), toUInt16(least(1 + floor(log2(latency_ms / 0.1) * 16), 475))), toUInt64(1)) AS latency_hist
FROM requests
GROUP BY bucket, org_id, tier;
