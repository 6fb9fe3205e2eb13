-- Projections over every org: the org-level rollups by bucket alone, the endpoint-level ones
-- by bucket, endpoint and method. A question about every org (an operator's view without an
-- org filter) merged one row per org of each bucket: on the dashboard bench's 10M events the
-- 30-day endpoints answer merged ~34k latency states for 11 endpoint x method pairs, the 24-hour
-- summary ~2,400 for one total. A projection keeps each part's rows pre-merged without org,
-- and ClickHouse reads it for a query whose filter and groups it covers (no org, no API key);
-- a question about one org reads the table as before. The projection lives in the table's own
-- parts (written by the same inserts, the rollup views' and the sink's repair's, dropped by the
-- same TTL), so its answers are the table's, exactly: sums, and latency bucket counts merged.
-- AggregatingMergeTree merges rows of a part together: 'rebuild' makes a merge compute the
-- merged part's projection again from its rows (the default refuses projections on it), and
-- a DELETE (none in the code; by hand, or a test simulating a lost group) rebuild it likewise.
-- MATERIALIZE builds it for the parts already stored; until a part has it, a query reads that
-- part's rows instead. Each statement may run again after a failed migration.

ALTER TABLE requests_org_1m MODIFY SETTING deduplicate_merge_projection_mode = 'rebuild', lightweight_mutation_projection_mode = 'rebuild';

ALTER TABLE requests_org_1m ADD PROJECTION IF NOT EXISTS every_org
    (SELECT bucket, sum(requests), sum(errors), sum(denials), sum(request_bytes), sum(response_bytes), quantilesExactWeightedMerge(0.5, 0.95, 0.99)(latency_hist) GROUP BY bucket);

ALTER TABLE requests_org_1m MATERIALIZE PROJECTION every_org SETTINGS mutations_sync = 2;

ALTER TABLE requests_org_1h MODIFY SETTING deduplicate_merge_projection_mode = 'rebuild', lightweight_mutation_projection_mode = 'rebuild';

ALTER TABLE requests_org_1h ADD PROJECTION IF NOT EXISTS every_org
    (SELECT bucket, sum(requests), sum(errors), sum(denials), sum(request_bytes), sum(response_bytes), quantilesExactWeightedMerge(0.5, 0.95, 0.99)(latency_hist) GROUP BY bucket);

ALTER TABLE requests_org_1h MATERIALIZE PROJECTION every_org SETTINGS mutations_sync = 2;

ALTER TABLE requests_org_1d MODIFY SETTING deduplicate_merge_projection_mode = 'rebuild', lightweight_mutation_projection_mode = 'rebuild';

ALTER TABLE requests_org_1d ADD PROJECTION IF NOT EXISTS every_org
    (SELECT bucket, sum(requests), sum(errors), sum(denials), sum(request_bytes), sum(response_bytes), quantilesExactWeightedMerge(0.5, 0.95, 0.99)(latency_hist) GROUP BY bucket);

ALTER TABLE requests_org_1d MATERIALIZE PROJECTION every_org SETTINGS mutations_sync = 2;

ALTER TABLE requests_endpoint_1m MODIFY SETTING deduplicate_merge_projection_mode = 'rebuild', lightweight_mutation_projection_mode = 'rebuild';

ALTER TABLE requests_endpoint_1m ADD PROJECTION IF NOT EXISTS every_org
    (SELECT bucket, endpoint, method, sum(requests), sum(errors), sum(request_bytes), sum(response_bytes), quantilesExactWeightedMerge(0.5, 0.95, 0.99)(latency_hist) GROUP BY bucket, endpoint, method);

ALTER TABLE requests_endpoint_1m MATERIALIZE PROJECTION every_org SETTINGS mutations_sync = 2;

ALTER TABLE requests_endpoint_1h MODIFY SETTING deduplicate_merge_projection_mode = 'rebuild', lightweight_mutation_projection_mode = 'rebuild';

ALTER TABLE requests_endpoint_1h ADD PROJECTION IF NOT EXISTS every_org
    (SELECT bucket, endpoint, method, sum(requests), sum(errors), sum(request_bytes), sum(response_bytes), quantilesExactWeightedMerge(0.5, 0.95, 0.99)(latency_hist) GROUP BY bucket, endpoint, method);

ALTER TABLE requests_endpoint_1h MATERIALIZE PROJECTION every_org SETTINGS mutations_sync = 2;

ALTER TABLE requests_endpoint_1d MODIFY SETTING deduplicate_merge_projection_mode = 'rebuild', lightweight_mutation_projection_mode = 'rebuild';

ALTER TABLE requests_endpoint_1d ADD PROJECTION IF NOT EXISTS every_org
    (SELECT bucket, endpoint, method, sum(requests), sum(errors), sum(request_bytes), sum(response_bytes), quantilesExactWeightedMerge(0.5, 0.95, 0.99)(latency_hist) GROUP BY bucket, endpoint, method);

ALTER TABLE requests_endpoint_1d MATERIALIZE PROJECTION every_org SETTINGS mutations_sync = 2;
