"""Looking at a running pipeline from outside, as an operator would: consumer lag,
topic sizes, decisions in Redis."""

from __future__ import annotations

import time

import redis
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from quotaflow.schemas.redis_keys import USAGE_KEY_PATTERN, Decision, usage_subject
from quotaflow.schemas.topics import EVENTS_TOPIC, PROCESSOR_EVENTS_GROUP, SINK_CLICKHOUSE_GROUP

# The processor's own backlog (processors/metrics.py, set by processors/app.py): records not applied yet, skipped ones
# included; NaN until the processor has its partitions. What "caught up" means for it, unlike its
# group's lag.
PROCESSOR_BACKLOG_METRIC = "quotaflow_processor_backlog_records"


async def partitions(bootstrap: str, topic: str) -> list[int]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        (desc,) = await admin.describe_topics([topic])
    finally:
        await admin.close()
    return sorted(p["partition"] for p in desc["partitions"])


async def end_offsets(bootstrap: str, topic: str) -> dict[int, int]:
    """Next offset of each partition of ``topic``: how many records it ever held."""
    parts = await partitions(bootstrap, topic)
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    await consumer.start()
    try:
        ends = await consumer.end_offsets([TopicPartition(topic, p) for p in parts])
        return {tp.partition: off for tp, off in ends.items()}
    finally:
        await consumer.stop()


async def group_lag(bootstrap: str, group: str, topic: str) -> int:
    """Records of ``topic`` the consumer group has not committed yet."""
    ends = await end_offsets(bootstrap, topic)
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        committed = await admin.list_consumer_group_offsets(group)
    finally:
        await admin.close()
    done = {tp.partition: meta.offset for tp, meta in committed.items() if tp.topic == topic and meta.offset >= 0}
    return sum(max(end - done.get(p, 0), 0) for p, end in ends.items())


async def pipeline_caught_up(bootstrap: str) -> bool:
    """Have the processor and the sink both committed every event published so far?"""
    return await _committed_all(bootstrap, (PROCESSOR_EVENTS_GROUP, SINK_CLICKHOUSE_GROUP))


async def sink_caught_up(bootstrap: str) -> bool:
    """Has the sink committed every event published so far?"""
    return await _committed_all(bootstrap, (SINK_CLICKHOUSE_GROUP,))


async def _committed_all(bootstrap: str, groups: tuple[str, ...]) -> bool:
    try:
        lags = [await group_lag(bootstrap, group, EVENTS_TOPIC) for group in groups]
    except KafkaError:  # e.g. the group coordinator is still being created on a fresh broker
        return False
    return not any(lags)


def decisions(client: redis.Redis) -> dict[str, Decision]:
    """api_key_id -> the decision the processors last wrote for it."""
    keys = list(client.scan_iter(match=USAGE_KEY_PATTERN, count=1000))
    pipe = client.pipeline(transaction=False)
    for k in keys:
        pipe.hgetall(k)
    decisions = {}
    for name, raw in zip(keys, pipe.execute(), strict=True):
        subject, decision = usage_subject(name.decode()), Decision.from_redis(raw)
        if decision is not None and subject is not None and subject[1] is not None:
            decisions[subject[1]] = decision
    return decisions


def denied_keys(client: redis.Redis, now_ms: int | None = None) -> set[str]:
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    return {key for key, d in decisions(client).items() if d.denies_at(now_ms)}
