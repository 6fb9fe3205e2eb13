"""The rules and silences the alerts stage evaluates with, followed while it runs: a task
reads both compacted topics from the start and keeps reading, so a rule added, replaced
or removed (or a silence) takes effect within a poll, without a restart. ``loaded`` is set
once both were read to the end they had when the stage started.

Silences (schemas/alert_rules.py Silence) live on ALERT_SILENCES_TOPIC, keyed by
"<org>/<silence id>" ("*" for every org), a tombstone when removed. Records that do not
parse are skipped and logged, never fatal.
"""

from __future__ import annotations

import asyncio
import logging

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError
from pydantic import ValidationError

from quotaflow.alerts.rules import Rules, RuleStore
from quotaflow.schemas.alert_rules import Silence
from quotaflow.schemas.topics import ALERT_RULES_TOPIC, ALERT_SILENCES_TOPIC

log = logging.getLogger(__name__)


class Sources:
    def __init__(self, bootstrap: str):
        self.bootstrap = bootstrap
        self.rules = Rules()
        self.silences: dict[str, Silence] = {}
        self.loaded = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._consumer: AIOKafkaConsumer | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._follow(), name="alert rules and silences")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def apply(self, record) -> None:
        if record.topic == ALERT_RULES_TOPIC:
            before = len(self.rules.skipped)
            RuleStore._apply(self.rules, record)
            if len(self.rules.skipped) > before:
                log.warning("alert rule record skipped", extra={"reason": self.rules.skipped[-1]})
                del self.rules.skipped[:-20]
            return
        key = (record.key or b"").decode(errors="replace")
        if record.value is None:
            self.silences.pop(key, None)
            return
        try:
            self.silences[key] = Silence.model_validate_json(record.value)
        except ValidationError as exc:
            log.warning("silence record skipped", extra={"offset": record.offset, "errors": exc.error_count()})

    async def _follow(self) -> None:
        while True:
            consumer = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, enable_auto_commit=False,
                                        metadata_max_age_ms=5000)
            try:
                await consumer.start()
                tps = [TopicPartition(ALERT_RULES_TOPIC, 0), TopicPartition(ALERT_SILENCES_TOPIC, 0)]
                consumer.assign(tps)
                await consumer.seek_to_beginning(*tps)
                ends = await consumer.end_offsets(tps)
                self.rules, self.silences = Rules(), {}
                while True:
                    got = await consumer.getmany(*tps, timeout_ms=200)
                    for records in got.values():
                        for record in records:
                            self.apply(record)
                    if not self.loaded.is_set() and all([await consumer.position(tp) >= ends[tp] for tp in tps]):
                        log.info("alert rules loaded", extra={"rules": len(self.rules.records),
                                                              "silences": len(self.silences)})
                        self.loaded.set()
            except KafkaError as exc:  # read them again from the start once the broker is back
                log.warning("alert rules unavailable; reading them again", extra={"error": str(exc)[:200]})
                await asyncio.sleep(1.0)
            finally:
                await consumer.stop()
