"""The shared topics, created with their settings (the broker auto-creates nothing)."""

from __future__ import annotations

import asyncio
import logging

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from quotaflow.core.errors import OperatorError
from quotaflow.core.retry import retry
from quotaflow.core.settings import Settings
from quotaflow.schemas.topics import (
    ALERT_HISTORY_RETENTION_MS,
    ALERT_HISTORY_TOPIC,
    ALERT_RULES_TOPIC,
    ALERT_SILENCES_TOPIC,
    DEAD_LETTER_RETENTION_MS,
    DEAD_LETTER_TOPIC,
    EVENTS_RETENTION_MS,
    EVENTS_TIMESTAMP_TYPE,
    EVENTS_TOPIC,
    KEYS_MIN_COMPACTION_LAG_MS,
    KEYS_PARTITIONS,
    KEYS_TOPIC,
    WINDOW_COUNTS_TOPIC,
)

log = logging.getLogger(__name__)
TOPIC_EXISTS = 36  # Kafka error code TOPIC_ALREADY_EXISTS
TIMESTAMP_TYPE = "message.timestamp.type"
CLEANUP_POLICY = "cleanup.policy"
MIN_COMPACTION_LAG = "min.compaction.lag.ms"
MIN_INSYNC_REPLICAS = "min.insync.replicas"
DEFAULT_CONFIG = 5  # DescribeConfigs config source DEFAULT_CONFIG
KEYS_CONFIGS = {CLEANUP_POLICY: "compact", MIN_COMPACTION_LAG: str(KEYS_MIN_COMPACTION_LAG_MS)}
ALERT_RULES_CONFIGS = {CLEANUP_POLICY: "compact"}
# Every batch rewrites the subjects it touches: segments rolled often so the log cleaner
# compacts them, and a recovery reads one record per subject, not one per batch.
WINDOW_COUNTS_CONFIGS = {CLEANUP_POLICY: "compact", "segment.ms": str(5 * 60_000), "min.cleanable.dirty.ratio": "0.1"}


def wanted(settings: Settings) -> list[NewTopic]:
    rf = settings.kafka_replication_factor  # 1 with one broker, 3 with three
    cluster = _cluster_configs(settings)
    return [
        NewTopic(EVENTS_TOPIC, settings.events_partitions, rf,
                 topic_configs={"retention.ms": str(EVENTS_RETENTION_MS), TIMESTAMP_TYPE: EVENTS_TIMESTAMP_TYPE,
                                **cluster}),
        NewTopic(DEAD_LETTER_TOPIC, 1, rf, topic_configs={"retention.ms": str(DEAD_LETTER_RETENTION_MS), **cluster}),
        # The API key registry: compacted (each key's last record kept for ever, so Redis can
        # be rebuilt from it), and every change kept a week first, for the audit.
        NewTopic(KEYS_TOPIC, KEYS_PARTITIONS, rf, topic_configs={**KEYS_CONFIGS, **cluster}),
        # Compacted: the latest record of each rule is kept for good (one partition: a
        # reader rebuilds every rule by reading it from the start).
        NewTopic(ALERT_RULES_TOPIC, 1, rf, topic_configs={**ALERT_RULES_CONFIGS, **cluster}),
        NewTopic(ALERT_SILENCES_TOPIC, 1, rf, topic_configs={**ALERT_RULES_CONFIGS, **cluster}),
        # What alerts did (transitions, delivery attempts), on its way to ClickHouse.
        NewTopic(ALERT_HISTORY_TOPIC, 1, rf, topic_configs={"retention.ms": str(ALERT_HISTORY_RETENTION_MS), **cluster}),
        # The processors' counts: a partition for each of the events topic's.
        NewTopic(WINDOW_COUNTS_TOPIC, settings.events_partitions, rf, topic_configs={**WINDOW_COUNTS_CONFIGS, **cluster}),
    ]


def _cluster_configs(settings: Settings) -> dict[str, str]:
    """With several replicas, how many must have a record before it is acknowledged
    (acks=all): 2 of 3, so one broker can be lost without losing an acknowledged record
    or refusing writes. One broker: nothing (the broker's default, 1)."""
    if settings.kafka_replication_factor == 1:
        return {}
    return {MIN_INSYNC_REPLICAS: str(settings.kafka_min_insync_replicas)}


class _NotCreated(Exception):
    """Topics the broker refused to create (besides those that exist), by name: (code, message)."""


async def ensure_topics(settings: Settings, timeout_s: float = 60) -> list[str]:
    """Create the missing topics; return the names created. A freshly started broker
    refuses creation until the controller has unfenced it: retry until then."""
    created: list[str] = []
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    await admin.start()

    async def create() -> None:
        existing = set(await admin.list_topics())
        missing = [t for t in wanted(settings) if t.name not in existing]
        if not missing:
            return
        response = await admin.create_topics(missing)
        errors = {name: (code, msg) for name, code, msg in
                  (entry[:3] for entry in response.topic_errors) if code not in (0, TOPIC_EXISTS)}
        created.extend(t.name for t in missing if t.name not in errors)
        if errors:
            raise _NotCreated(errors)

    try:
        try:
            await retry(create, "creating Kafka topics", on=_NotCreated, max_s=1.0, give_up_after_s=timeout_s,
                        level=logging.INFO, logger=log)
        except _NotCreated as exc:
            raise OperatorError(f"could not create Kafka topics: {exc}") from None
        await _ensure_configs(admin, EVENTS_TOPIC, {TIMESTAMP_TYPE: EVENTS_TIMESTAMP_TYPE},
                              "stamping the events topic's records with their arrival time")
        await _ensure_configs(admin, KEYS_TOPIC, KEYS_CONFIGS, "compacting the keys topic")
        await _ensure_configs(admin, ALERT_RULES_TOPIC, ALERT_RULES_CONFIGS, "compacting the alert rules topic")
        await _ensure_configs(admin, ALERT_SILENCES_TOPIC, ALERT_RULES_CONFIGS, "compacting the alert silences topic")
        if cluster := _cluster_configs(settings):
            for topic in (EVENTS_TOPIC, DEAD_LETTER_TOPIC, KEYS_TOPIC, ALERT_RULES_TOPIC, ALERT_SILENCES_TOPIC,
                          ALERT_HISTORY_TOPIC, WINDOW_COUNTS_TOPIC):
                await _ensure_configs(admin, topic, cluster, "requiring acknowledgements of several replicas")
        return created
    finally:
        await admin.close()


async def _ensure_configs(admin: AIOKafkaAdminClient, topic: str, wanted_configs: dict[str, str], why: str) -> None:
    """Give an existing topic the settings the stages rely on: the events topic stamps its
    records with their arrival time (LogAppendTime), as the stages judge event times
    against it; the keys topic is compacted. A topic made before that (or by hand) is
    altered, its other settings kept (AlterConfigs replaces the whole set)."""
    resource = ConfigResource(ConfigResourceType.TOPIC, topic)

    async def describe() -> list:
        (response,) = await admin.describe_configs([resource])
        code, message = response.resources[0][:2]
        if code:  # a broker that has not learnt of a topic just made: its set would look empty
            raise _NotCreated({topic: (code, message)})
        return response.resources[0][4]  # (name, value, read_only, config_source, is_sensitive, ...)

    try:
        entries = await retry(describe, f"reading the settings of {topic}", on=_NotCreated, max_s=0.5,
                              give_up_after_s=30, level=logging.DEBUG, logger=log)
    except _NotCreated as exc:
        raise OperatorError(f"could not read the settings of {topic}: {exc}") from None
    current = {e[0]: e[1] for e in entries if e[3] != DEFAULT_CONFIG and not e[2]}
    if all(current.get(name) == value for name, value in wanted_configs.items()):
        return
    log.warning(why, extra={"topic": topic})
    configs = {**current, **wanted_configs}
    (altered,) = await admin.alter_configs([ConfigResource(ConfigResourceType.TOPIC, topic, configs)])
    code, message = altered.resources[0][:2]
    if code:
        settings = ", ".join(f"{k}={v}" for k, v in wanted_configs.items())
        raise OperatorError(f"could not set {settings} on {topic}: {message}")


def ensure_topics_sync(settings: Settings) -> list[str]:
    return asyncio.run(ensure_topics(settings))
