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
    ALERT_RULES_TOPIC,
    DEAD_LETTER_RETENTION_MS,
    DEAD_LETTER_TOPIC,
    EVENTS_RETENTION_MS,
    EVENTS_TIMESTAMP_TYPE,
    EVENTS_TOPIC,
)

log = logging.getLogger(__name__)
TOPIC_EXISTS = 36  # Kafka error code TOPIC_ALREADY_EXISTS
TIMESTAMP_TYPE = "message.timestamp.type"
DEFAULT_CONFIG = 5  # DescribeConfigs config source DEFAULT_CONFIG


def wanted(settings: Settings) -> list[NewTopic]:
    return [
        NewTopic(EVENTS_TOPIC, settings.events_partitions, 1,
                 topic_configs={"retention.ms": str(EVENTS_RETENTION_MS), TIMESTAMP_TYPE: EVENTS_TIMESTAMP_TYPE}),
        NewTopic(DEAD_LETTER_TOPIC, 1, 1, topic_configs={"retention.ms": str(DEAD_LETTER_RETENTION_MS)}),
        # Compacted: the latest record of each rule is kept for good (one partition: a
        # reader rebuilds every rule by reading it from the start).
        NewTopic(ALERT_RULES_TOPIC, 1, 1, topic_configs={"cleanup.policy": "compact"}),
    ]


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
        await _stamp_on_arrival(admin)
        return created
    finally:
        await admin.close()


async def _stamp_on_arrival(admin: AIOKafkaAdminClient) -> None:
    """Make the broker stamp event records with their arrival time (LogAppendTime), as
    the stages judge event times against it; a topic made before that (or by hand) is
    altered, its other settings kept (AlterConfigs replaces the whole set)."""
    resource = ConfigResource(ConfigResourceType.TOPIC, EVENTS_TOPIC)
    (response,) = await admin.describe_configs([resource])
    entries = response.resources[0][4]  # (name, value, read_only, config_source, is_sensitive, ...)
    current = {e[0]: e[1] for e in entries if e[3] != DEFAULT_CONFIG and not e[2]}
    if current.get(TIMESTAMP_TYPE) == EVENTS_TIMESTAMP_TYPE:
        return
    log.warning("stamping the events topic's records with their arrival time", extra={"topic": EVENTS_TOPIC})
    configs = {**current, TIMESTAMP_TYPE: EVENTS_TIMESTAMP_TYPE}
    (altered,) = await admin.alter_configs([ConfigResource(ConfigResourceType.TOPIC, EVENTS_TOPIC, configs)])
    code, message = altered.resources[0][:2]
    if code:
        raise OperatorError(f"could not set {TIMESTAMP_TYPE}={EVENTS_TIMESTAMP_TYPE} on {EVENTS_TOPIC}: {message}")


def ensure_topics_sync(settings: Settings) -> list[str]:
    return asyncio.run(ensure_topics(settings))
