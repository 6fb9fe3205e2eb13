"""The shared topics, created with their settings (the broker auto-creates nothing)."""

from __future__ import annotations

import asyncio
import logging

from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from deploy.procs import StackError
from quotaflow.settings import Settings
from schemas.topics import DEAD_LETTER_RETENTION_MS, DEAD_LETTER_TOPIC, EVENTS_RETENTION_MS, EVENTS_TOPIC

log = logging.getLogger(__name__)
TOPIC_EXISTS = 36  # Kafka error code TOPIC_ALREADY_EXISTS


def wanted(settings: Settings) -> list[NewTopic]:
    return [
        NewTopic(EVENTS_TOPIC, settings.events_partitions, 1,
                 topic_configs={"retention.ms": str(EVENTS_RETENTION_MS)}),
        NewTopic(DEAD_LETTER_TOPIC, 1, 1, topic_configs={"retention.ms": str(DEAD_LETTER_RETENTION_MS)}),
    ]


async def ensure_topics(settings: Settings, timeout_s: float = 60) -> list[str]:
    """Create the missing topics; return the names created. A freshly started broker
    refuses creation until the controller has unfenced it: retry until then."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    created: list[str] = []
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    await admin.start()
    try:
        while True:
            existing = set(await admin.list_topics())
            missing = [t for t in wanted(settings) if t.name not in existing]
            if not missing:
                return created
            response = await admin.create_topics(missing)
            errors = {name: (code, msg) for name, code, msg in
                      (entry[:3] for entry in response.topic_errors) if code not in (0, TOPIC_EXISTS)}
            created += [t.name for t in missing if t.name not in errors]
            if errors and loop.time() > deadline:
                raise StackError(f"could not create Kafka topics: {errors}")
            if errors:
                await asyncio.sleep(0.5)
    finally:
        await admin.close()


def ensure_topics_sync(settings: Settings) -> list[str]:
    return asyncio.run(ensure_topics(settings))
