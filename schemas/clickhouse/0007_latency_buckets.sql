-- Latency in every rollup as counts per log-spaced latency bucket (schemas/clickhouse/latency.py):
-- a state that merges in bounded size (one count per bucket, however many rows are merged),
-- where the t-digest states of 0002/0003 grew with every row merged. Quantiles within 2.2 %
-- of the exact ones (the bucket's geometric midpoint); the query API reads them through
-- latency.quantiles_sql. The t-digest column is dropped by 0008, once this one is filled.
--
-- For each rollup: the new column; the rows stored so far converted from their t-digest
-- state; the view replaced by one filling the new column. A t-digest state is its centroids
-- (a varint count, then per centroid its mean and weight as Float32s: ClickHouse's
-- QuantileTDigest::serialize), and each centroid's weight goes to the bucket of its mean. A
-- row of few requests has one centroid per request, so its counts are exact; in a larger one
-- a centroid stands for neighbouring latencies, the t-digest's own approximation. A state
-- laid out otherwise stops the migration (throwIf) rather than store wrong counts.
-- Statements may run again after a failed migration: the conversion reads the t-digest
-- column, kept until 0008, and sets the same states again. The sink applies migrations
-- before it consumes: no rows arrive meanwhile.

ALTER TABLE requests_1m ADD COLUMN IF NOT EXISTS latency_hist AggregateFunction(quantilesExactWeighted(0.5, 0.95, 0.99), UInt16, UInt64);

ALTER TABLE requests_1m UPDATE latency_hist = arrayReduce('quantilesExactWeightedState(0.5, 0.95, 0.99)',
    arrayMap(s -> arrayMap(i -> if(NOT (reinterpretAsFloat32(substring(s, if(reinterpretAsUInt8(substring(s, 1, 1)) < 128, 1, 2) + 8 * i + 1, 4)) >= 0.1), toUInt16(0), toUInt16(least(1 + floor(log2(reinterpretAsFloat32(substring(s, if(reinterpretAsUInt8(substring(s, 1, 1)) < 128, 1, 2) + 8 * i + 1, 4)) / 0.1) * 16), 475))),
                          range(throwIf(length(s) != if(reinterpretAsUInt8(substring(s, 1, 1)) < 128, 1, 2) + 8 * if(reinterpretAsUInt8(substring(s, 1, 1)) < 128, reinterpretAsUInt8(substring(s, 1, 1)), bitAnd(reinterpretAsUInt8(substring(s, 1, 1)), 127) + reinterpretAsUInt8(substring(s, 2, 1)) * 128), 'unexpected layout of a t-digest state') + if(reinterpretAsUInt8(substring(s, 1, 1)) < 128, reinterpretAsUInt8(substring(s, 1, 1)), bitAnd(reinterpretAsUInt8(substring(s, 1, 1)), 127) + reinterpretAsUInt8(substring(s, 2, 1)) * 128))),
             [toString(latency_ms)])[1],
    arrayMap(s -> arrayMap(i -> toUInt64(round(reinterpretAsFloat32(substring(s, if(reinterpretAsUInt8(substring(s, 1, 1)) < 128, 1, 2) + 8 * i + 5, 4)))), range(if(reinterpretAsUInt8(substring(s, 1, 1)) < 128, reinterpretAsUInt8(substring(s, 1, 1)), bitAnd(reinterpretAsUInt8(substring(s, 1, 1)), 127) + reinterpretAsUInt8(substring(s, 2, 1)) * 128))),
             [toString(latency_ms)])[1])
WHERE 1 SETTINGS mutations_sync = 2;

DROP VIEW IF EXISTS requests_1m_mv;

CREATE MATERIALIZED VIEW IF NOT EXISTS requests_1m_mv TO requests_1m AS
SELECT toStartOfMinute(toDateTime(event_time)) AS bucket, org_id, tier, api_key_id, endpoint, method, status, count() AS requests, countIf(status >= 500) AS errors, sum(request_bytes) AS request_bytes,
       sum(response_bytes) AS response_bytes,
       quantilesExactWeightedState(0.5, 0.95, 0.99)(if(NOT (latency_ms >= 0.1), toUInt16(0), toUInt16(least(1 + floor(log2(latency_ms / 0.1) * 16), 475))), toUInt64(1)) AS latency_hist
FROM requests
GROUP BY bucket, org_id, tier, api_key_id, endpoint, method, status;

ALTER TABLE requests_1h ADD COLUMN IF NOT EXISTS latency_hist AggregateFunction(quantilesExactWeighted(0.5, 0.95, 0.99), UInt16, UInt64);

ALTER TABLE requests_1h UPDATE latency_hist = arrayReduce('quantilesExactWeightedState(0.5, 0.95, 0.99)',
    arrayMap(s -> arrayMap(i -> if(NOT (reinterpretAsFloat32(substring(s, if(reinterpretAsUInt8(substring(s, 1, 1)) < 128, 1, 2) + 8 * i + 1, 4)) >= 0.1), toUInt16(0), toUInt16(least(1 + floor(log2(reinterpretAsFloat32(substring(s, if(reinterpretAsUInt8(substring(s, 1, 1)) < 128, 1, 2) + 8 * i + 1, 4)) / 0.1) * 16), 475))),
                          range(throwIf(length(s) != if(reinterpretAsUInt8(substring(s, 1, 1)) < 128, 1, 2) + 8 * if(reinterpretAsUInt8(substring(s, 1, 1)) < 128, reinterpretAsUInt8(substring(s, 1, 1)), bitAnd(reinterpretAsUInt8(substring(s, 1, 1)), 127) + reinterpretAsUInt8(substring(s, 2, 1)) * 128), 'unexpected layout of a t-digest state') + if(reinterpretAsUInt8(substring(s, 1, 1)) < 128, reinterpretAsUInt8(substring(s, 1, 1)), bitAnd(reinterpretAsUInt8(substring(s, 1, 1)), 127) + reinterpretAsUInt8(substring(s, 2, 1)) * 128))),
             [toString(latency_ms)])[1],
    arrayMap(s -> arrayMap(i -> toUInt64(round(reinterpretAsFloat32(substring(s, if(reinterpretAsUInt8(substring(s, 1, 1)) < 128, 1, 2) + 8 * i + 5, 4)))), range(if(reinterpretAsUInt8(substring(s, 1, 1)) < 128, reinterpretAsUInt8(substring(s, 1, 1)), bitAnd(reinterpretAsUInt8(substring(s, 1, 1)), 127) + reinterpretAsUInt8(substring(s, 2, 1)) * 128))),
             [toString(latency_ms)])[1])
WHERE 1 SETTINGS mutations_sync = 2;

DROP VIEW IF EXISTS requests_1h_mv;

CREATE MATERIALIZED VIEW IF NOT EXISTS requests_1h_mv TO requests_1h AS
SELECT toStartOfHour(toDateTime(event_time)) AS bucket, org_id, tier, api_key_id, endpoint, method, status, count() AS requests, countIf(status >= 500) AS errors, sum(request_bytes) AS request_bytes,
       sum(response_bytes) AS response_bytes,
       quantilesExactWeightedState(0.5, 0.95, 0.99)(if(NOT (latency_ms >= 0.1), toUInt16(0), toUInt16(least(1 + floor(log2(latency_ms / 0.1) * 16), 475))), toUInt64(1)) AS latency_hist
FROM requests
GROUP BY bucket, org_id, tier, api_key_id, endpoint, method, status;

ALTER TABLE requests_1d ADD COLUMN IF NOT EXISTS latency_hist AggregateFunction(quantilesExactWeighted(0.5, 0.95, 0.99), UInt16, UInt64);

ALTER TABLE requests_1d UPDATE latency_hist = arrayReduce('quantilesExactWeightedState(0.5, 0.95, 0.99)',
    arrayMap(s -> arrayMap(i -> if(NOT (reinterpretAsFloat32(substring(s, if(reinterpretAsUInt8(substring(s, 1, 1)) < 128, 1, 2) + 8 * i + 1, 4)) >= 0.1), toUInt16(0), toUInt16(least(1 + floor(log2(reinterpretAsFloat32(substring(s, if(reinterpretAsUInt8(substring(s, 1, 1)) < 128, 1, 2) + 8 * i + 1, 4)) / 0.1) * 16), 475))),
                          range(throwIf(length(s) != if(reinterpretAsUInt8(substring(s, 1, 1)) < 128, 1, 2) + 8 * if(reinterpretAsUInt8(substring(s, 1, 1)) < 128, reinterpretAsUInt8(substring(s, 1, 1)), bitAnd(reinterpretAsUInt8(substring(s, 1, 1)), 127) + reinterpretAsUInt8(substring(s, 2, 1)) * 128), 'unexpected layout of a t-digest state') + if(reinterpretAsUInt8(substring(s, 1, 1)) < 128, reinterpretAsUInt8(substring(s, 1, 1)), bitAnd(reinterpretAsUInt8(substring(s, 1, 1)), 127) + reinterpretAsUInt8(substring(s, 2, 1)) * 128))),
             [toString(latency_ms)])[1],
    arrayMap(s -> arrayMap(i -> toUInt64(round(reinterpretAsFloat32(substring(s, if(reinterpretAsUInt8(substring(s, 1, 1)) < 128, 1, 2) + 8 * i + 5, 4)))), range(if(reinterpretAsUInt8(substring(s, 1, 1)) < 128, reinterpretAsUInt8(substring(s, 1, 1)), bitAnd(reinterpretAsUInt8(substring(s, 1, 1)), 127) + reinterpretAsUInt8(substring(s, 2, 1)) * 128))),
             [toString(latency_ms)])[1])
WHERE 1 SETTINGS mutations_sync = 2;

DROP VIEW IF EXISTS requests_1d_mv;

CREATE MATERIALIZED VIEW IF NOT EXISTS requests_1d_mv TO requests_1d AS
SELECT toStartOfDay(toDateTime(event_time)) AS bucket, org_id, tier, api_key_id, endpoint, method, status, count() AS requests, countIf(status >= 500) AS errors, sum(request_bytes) AS request_bytes,
       sum(response_bytes) AS response_bytes,
       quantilesExactWeightedState(0.5, 0.95, 0.99)(if(NOT (latency_ms >= 0.1), toUInt16(0), toUInt16(least(1 + floor(log2(latency_ms / 0.1) * 16), 475))), toUInt64(1)) AS latency_hist
FROM requests
GROUP BY bucket, org_id, tier, api_key_id, endpoint, method, status;

ALTER TABLE requests_org_1m ADD COLUMN IF NOT EXISTS latency_hist AggregateFunction(quantilesExactWeighted(0.5, 0.95, 0.99), UInt16, UInt64);

ALTER TABLE requests_org_1m UPDATE latency_hist = arrayReduce('quantilesExactWeightedState(0.5, 0.95, 0.99)',
    arrayMap(s -> arrayMap(i -> if(NOT (reinterpretAsFloat32(substring(s, if(reinterpretAsUInt8(substring(s, 1, 1)) < 128, 1, 2) + 8 * i + 1, 4)) >= 0.1), toUInt16(0), toUInt16(least(1 + floor(log2(reinterpretAsFloat32(substring(s, if(reinterpretAsUInt8(substring(s, 1, 1)) < 128, 1, 2) + 8 * i + 1, 4)) / 0.1) * 16), 475))),
                          range(throwIf(length(s) != if(reinterpretAsUInt8(substring(s, 1, 1)) < 128, 1, 2) + 8 * if(reinterpretAsUInt8(substring(s, 1, 1)) < 128, reinterpretAsUInt8(substring(s, 1, 1)), bitAnd(reinterpretAsUInt8(substring(s, 1, 1)), 127) + reinterpretAsUInt8(substring(s, 2, 1)) * 128), 'unexpected layout of a t-digest state') + if(reinterpretAsUInt8(substring(s, 1, 1)) < 128, reinterpretAsUInt8(substring(s, 1, 1)), bitAnd(reinterpretAsUInt8(substring(s, 1, 1)), 127) + reinterpretAsUInt8(substring(s, 2, 1)) * 128))),
             [toString(latency_ms)])[1],
    arrayMap(s -> arrayMap(i -> toUInt64(round(reinterpretAsFloat32(substring(s, if(reinterpretAsUInt8(substring(s, 1, 1)) < 128, 1, 2) + 8 * i + 5, 4)))), range(if(reinterpretAsUInt8(substring(s, 1, 1)) < 128, reinterpretAsUInt8(substring(s, 1, 1)), bitAnd(reinterpretAsUInt8(substring(s, 1, 1)), 127) + reinterpretAsUInt8(substring(s, 2, 1)) * 128))),
             [toString(latency_ms)])[1])
WHERE 1 SETTINGS mutations_sync = 2;

DROP VIEW IF EXISTS requests_org_1m_mv;

CREATE MATERIALIZED VIEW IF NOT EXISTS requests_org_1m_mv TO requests_org_1m AS
SELECT toStartOfMinute(toDateTime(event_time)) AS bucket, org_id, tier, count() AS requests, countIf(status >= 500) AS errors, countIf(status = 429) AS denials, sum(request_bytes) AS request_bytes,
       sum(response_bytes) AS response_bytes,
       quantilesExactWeightedState(0.5, 0.95, 0.99)(if(NOT (latency_ms >= 0.1), toUInt16(0), toUInt16(least(1 + floor(log2(latency_ms / 0.1) * 16), 475))), toUInt64(1)) AS latency_hist
FROM requests
GROUP BY bucket, org_id, tier;

ALTER TABLE requests_org_1h ADD COLUMN IF NOT EXISTS latency_hist AggregateFunction(quantilesExactWeighted(0.5, 0.95, 0.99), UInt16, UInt64);

ALTER TABLE requests_org_1h UPDATE latency_hist = arrayReduce('quantilesExactWeightedState(0.5, 0.95, 0.99)',
    arrayMap(s -> arrayMap(i -> if(NOT (reinterpretAsFloat32(substring(s, if(reinterpretAsUInt8(substring(s, 1, 1)) < 128, 1, 2) + 8 * i + 1, 4)) >= 0.1), toUInt16(0), toUInt16(least(1 + floor(log2(reinterpretAsFloat32(substring(s, if(reinterpretAsUInt8(substring(s, 1, 1)) < 128, 1, 2) + 8 * i + 1, 4)) / 0.1) * 16), 475))),
                          range(throwIf(length(s) != if(reinterpretAsUInt8(substring(s, 1, 1)) < 128, 1, 2) + 8 * if(reinterpretAsUInt8(substring(s, 1, 1)) < 128, reinterpretAsUInt8(substring(s, 1, 1)), bitAnd(reinterpretAsUInt8(substring(s, 1, 1)), 127) + reinterpretAsUInt8(substring(s, 2, 1)) * 128), 'unexpected layout of a t-digest state') + if(reinterpretAsUInt8(substring(s, 1, 1)) < 128, reinterpretAsUInt8(substring(s, 1, 1)), bitAnd(reinterpretAsUInt8(substring(s, 1, 1)), 127) + reinterpretAsUInt8(substring(s, 2, 1)) * 128))),
             [toString(latency_ms)])[1],
    arrayMap(s -> arrayMap(i -> toUInt64(round(reinterpretAsFloat32(substring(s, if(reinterpretAsUInt8(substring(s, 1, 1)) < 128, 1, 2) + 8 * i + 5, 4)))), range(if(reinterpretAsUInt8(substring(s, 1, 1)) < 128, reinterpretAsUInt8(substring(s, 1, 1)), bitAnd(reinterpretAsUInt8(substring(s, 1, 1)), 127) + reinterpretAsUInt8(substring(s, 2, 1)) * 128))),
             [toString(latency_ms)])[1])
WHERE 1 SETTINGS mutations_sync = 2;

DROP VIEW IF EXISTS requests_org_1h_mv;

CREATE MATERIALIZED VIEW IF NOT EXISTS requests_org_1h_mv TO requests_org_1h AS
SELECT toStartOfHour(toDateTime(event_time)) AS bucket, org_id, tier, count() AS requests, countIf(status >= 500) AS errors, countIf(status = 429) AS denials, sum(request_bytes) AS request_bytes,
       sum(response_bytes) AS response_bytes,
       quantilesExactWeightedState(0.5, 0.95, 0.99)(if(NOT (latency_ms >= 0.1), toUInt16(0), toUInt16(least(1 + floor(log2(latency_ms / 0.1) * 16), 475))), toUInt64(1)) AS latency_hist
FROM requests
GROUP BY bucket, org_id, tier;

ALTER TABLE requests_org_1d ADD COLUMN IF NOT EXISTS latency_hist AggregateFunction(quantilesExactWeighted(0.5, 0.95, 0.99), UInt16, UInt64);

ALTER TABLE requests_org_1d UPDATE latency_hist = arrayReduce('quantilesExactWeightedState(0.5, 0.95, 0.99)',
    arrayMap(s -> arrayMap(i -> if(NOT (reinterpretAsFloat32(substring(s, if(reinterpretAsUInt8(substring(s, 1, 1)) < 128, 1, 2) + 8 * i + 1, 4)) >= 0.1), toUInt16(0), toUInt16(least(1 + floor(log2(reinterpretAsFloat32(substring(s, if(reinterpretAsUInt8(substring(s, 1, 1)) < 128, 1, 2) + 8 * i + 1, 4)) / 0.1) * 16), 475))),
                          range(throwIf(length(s) != if(reinterpretAsUInt8(substring(s, 1, 1)) < 128, 1, 2) + 8 * if(reinterpretAsUInt8(substring(s, 1, 1)) < 128, reinterpretAsUInt8(substring(s, 1, 1)), bitAnd(reinterpretAsUInt8(substring(s, 1, 1)), 127) + reinterpretAsUInt8(substring(s, 2, 1)) * 128), 'unexpected layout of a t-digest state') + if(reinterpretAsUInt8(substring(s, 1, 1)) < 128, reinterpretAsUInt8(substring(s, 1, 1)), bitAnd(reinterpretAsUInt8(substring(s, 1, 1)), 127) + reinterpretAsUInt8(substring(s, 2, 1)) * 128))),
             [toString(latency_ms)])[1],
    arrayMap(s -> arrayMap(i -> toUInt64(round(reinterpretAsFloat32(substring(s, if(reinterpretAsUInt8(substring(s, 1, 1)) < 128, 1, 2) + 8 * i + 5, 4)))), range(if(reinterpretAsUInt8(substring(s, 1, 1)) < 128, reinterpretAsUInt8(substring(s, 1, 1)), bitAnd(reinterpretAsUInt8(substring(s, 1, 1)), 127) + reinterpretAsUInt8(substring(s, 2, 1)) * 128))),
             [toString(latency_ms)])[1])
WHERE 1 SETTINGS mutations_sync = 2;

DROP VIEW IF EXISTS requests_org_1d_mv;

CREATE MATERIALIZED VIEW IF NOT EXISTS requests_org_1d_mv TO requests_org_1d AS
SELECT toStartOfDay(toDateTime(event_time)) AS bucket, org_id, tier, count() AS requests, countIf(status >= 500) AS errors, countIf(status = 429) AS denials, sum(request_bytes) AS request_bytes,
       sum(response_bytes) AS response_bytes,
       quantilesExactWeightedState(0.5, 0.95, 0.99)(if(NOT (latency_ms >= 0.1), toUInt16(0), toUInt16(least(1 + floor(log2(latency_ms / 0.1) * 16), 475))), toUInt64(1)) AS latency_hist
FROM requests
GROUP BY bucket, org_id, tier;
