-- Where the sink inserts: a Null table (it keeps nothing) whose view hands each block on
-- to requests, and from there to the rollup views. The columns that are LowCardinality in
-- requests are plain String here: a text format reads a LowCardinality value one at a
-- time through a temporary column (measured ~0.35 us a value, six such columns a row),
-- while the view converts a whole String column in one loop. The insert's deduplication
-- token reaches requests and the rollups through the views: a retried batch is dropped
-- there as before.
-- The columns of RAW_COLUMNS (schemas/clickhouse/tables.py), same types as in requests:
-- a column added to requests for the sink to fill is added here and to the view too.
CREATE TABLE IF NOT EXISTS requests_ingest
(
    event_id        UUID,
    event_time      DateTime64(3, 'UTC'),
    org_id          String,
    api_key_id      String,
    service         String,
    endpoint        String,
    method          String,
    status          UInt16,
    latency_ms      Float32,
    request_bytes   UInt64,
    response_bytes  UInt64,
    client_ip       IPv6,
    user_agent      String,
    schema_version  UInt8,
    kafka_partition UInt32,
    kafka_offset    UInt64,
    tier            String
)
ENGINE = Null;

CREATE MATERIALIZED VIEW IF NOT EXISTS requests_ingest_mv TO requests AS
SELECT event_id, event_time, org_id, api_key_id, service, endpoint, method, status, latency_ms, request_bytes,
       response_bytes, client_ip, user_agent, schema_version, kafka_partition, kafka_offset, tier
FROM requests_ingest;
