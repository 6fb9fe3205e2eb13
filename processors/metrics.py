"""The processor's Prometheus metrics (served on its metrics port)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

EVENTS = Counter("quotaflow_processor_events_total", "Events consumed by the processor, by outcome", ["outcome"])
DECISIONS = Counter("quotaflow_processor_decisions_written_total", "Decisions written to Redis")
BATCH_SECONDS = Histogram("quotaflow_processor_batch_seconds", "Time to process one batch",
                          buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
READY = Gauge("quotaflow_processor_ready", "1 once partitions are assigned and tables recovered")
BACKLOG = Gauge("quotaflow_processor_backlog_records",
                "Records of the assigned partitions not applied yet, skipped ones included (NaN until the "
                "processor has its partitions)")
BACKLOG.set(float("nan"))
FENCED = Counter("quotaflow_processor_writes_fenced_total",
                 "Counts not written to Redis because newer ones were there (another processor of the group "
                 "counted further: a partition taken over, or a stalled owner's late batch)")
