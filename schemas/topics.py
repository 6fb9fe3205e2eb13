"""Kafka topic and consumer group names: the contract between publishers and stages."""

EVENTS_TOPIC = "quotaflow.requests.v1"
# The broker stamps each event record with the time it arrived: stages judge event times
# against it (schemas.events.TimeBounds), so a publisher cannot choose the reference.
EVENTS_TIMESTAMP_TYPE = "LogAppendTime"
DEAD_LETTER_TOPIC = "quotaflow.deadletter.v1"
# The API key registry (schemas/api_keys.py KeyRecord): compacted, keyed by key id, every
# create, update, revoke and rotate a record. The source of truth: Redis is rebuilt from it.
KEYS_TOPIC = "quotaflow.keys.v1"
# One partition: a total order of every change (a rotation's two records go in one batch,
# appended together), read by one materializer. Changes are rare (people and admin calls).
KEYS_PARTITIONS = 1
# A record stays uncompacted this long at least, so the audit (the sink) sees every
# change even after being down for days; compaction keeps each key's last record after.
KEYS_MIN_COMPACTION_LAG_MS = 7 * 24 * 3600 * 1000
# Alert rules (schemas/alert_rules.py RuleRecord): compacted, keyed by "<org>/<rule id>"
# ("*/<rule id>" for a global rule); a removed rule is a tombstone. The source of truth.
ALERT_RULES_TOPIC = "quotaflow.alert-rules.v1"
# Alert history (schemas/alert_history.py): every transition of an alert and every
# delivery attempt, written by the alerts stage, stored in ClickHouse by the sink.
ALERT_HISTORY_TOPIC = "quotaflow.alert-history.v1"
# Silences (schemas/alert_rules.py Silence): compacted, keyed by "<org>/<silence id>".
ALERT_SILENCES_TOPIC = "quotaflow.alert-silences.v1"

# The processor's Faust app (the key registry's materializer): its id is also its consumer group.
PROCESSOR_APP_ID = "quotaflow-processor"
# The processors' group on the events topic (processors/consumer.py).
PROCESSOR_EVENTS_GROUP = "quotaflow-processor-events"
# The processors' table of counts (processors/table.py), compacted, partitioned as the events
# topic. Named as the Faust table it replaces named its changelog: an older one recovers.
WINDOW_COUNTS_TOPIC = "quotaflow-processor-window-counts-changelog"
ALERTS_APP_ID = "quotaflow-alerts"  # the alerts stage: its own group on the events topic, its tables
SINK_CLICKHOUSE_GROUP = "quotaflow-sink-clickhouse"
# The sink's audit of key changes (KEYS_TOPIC into ClickHouse): a group of its own.
SINK_KEYS_GROUP = "quotaflow-sink-clickhouse-keys"
# The sink's store of the alert history (ALERT_HISTORY_TOPIC into ClickHouse).
SINK_ALERTS_GROUP = "quotaflow-sink-clickhouse-alerts"
ALERT_HISTORY_RETENTION_MS = 30 * 24 * 3600 * 1000

# Retention of the shared topics. Events are kept long enough to replay a day of
# outage into ClickHouse; dead letters long enough for someone to look at them.
EVENTS_RETENTION_MS = 7 * 24 * 3600 * 1000
DEAD_LETTER_RETENTION_MS = 30 * 24 * 3600 * 1000
