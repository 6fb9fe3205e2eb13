"""The ClickHouse sink's Prometheus metrics (served on its metrics port)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

EVENTS = Counter("quotaflow_sink_events_total", "Events consumed by the ClickHouse sink, by outcome", ["outcome"])
ROWS = Counter("quotaflow_sink_rows_inserted_total",
               "Rows sent in successful inserts (a replayed batch ClickHouse drops as a duplicate counts again)")
INSERT_SECONDS = Histogram("quotaflow_sink_insert_seconds", "Duration of one ClickHouse insert",
                           buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
READY = Gauge("quotaflow_sink_ready", "1 once the sink has its partitions assigned")
INSERT_FAILURES = Counter("quotaflow_sink_insert_failures_total", "Failed ClickHouse inserts (retried)")
REPLAYS = Counter("quotaflow_sink_batches_replayed_total",
                  "Batches re-inserted from a plan left by a crash or a rebalance (duplicates are dropped by ClickHouse)")
REPAIRS = Counter("quotaflow_sink_repairs_total",
                  "Tables found, after a retried batch, lacking some of it (added), holding some twice (extra), or "
                  "busy with other writers (undecided: left as they are)", ["table", "outcome"])
DEDUP_FAILURES = Counter("quotaflow_sink_duplicate_check_failures_total",
                         "Failed duplicate checks in Redis (retried: the batch waits, nothing is stored unchecked)")
BUFFERED = Gauge("quotaflow_sink_buffered_records", "Records fetched from Kafka and held by the sink (buffered or being stored)")
STEP_SECONDS = Counter("quotaflow_sink_step_seconds_total",
                       "Time spent in each step of storing batches (decode: in its thread, wall; decode_cpu: that "
                       "thread's CPU; waiting: the store loop idle for want of a checked batch), for a profile",
                       ["step"])
