"""The sink's Kafka side: its consumer (in its own group, so it reads every event
whatever the processors do), the plans and commits of the plan protocol (plans.py),
and dead letters of rows ClickHouse refuses.

Reads and commits ride out a broker restart (core/retry.py), until the sink stops.
"""

from __future__ import annotations

import logging
import time

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError
from aiokafka.structs import OffsetAndMetadata

from quotaflow.core.retry import GaveUp, Pause, retry
from quotaflow.core.settings import Settings
from quotaflow.schemas import deadletter
from quotaflow.schemas.topics import DEAD_LETTER_TOPIC, EVENTS_TOPIC, SINK_CLICKHOUSE_GROUP
from quotaflow.sinks.clickhouse.plans import Range, parse_plan

log = logging.getLogger(__name__)

REFUSED = (CommitFailedError, IllegalStateError)  # a commit refused after a rebalance (the latter: no longer assigned)


class KafkaSide:
    def __init__(self, settings: Settings, pause: Pause):
        """``pause``: between retries; raises GaveUp when the sink is stopping."""
        self._pause = pause
        self.admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
        self.producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, enable_idempotence=True)
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=settings.kafka_bootstrap,
            group_id=SINK_CLICKHOUSE_GROUP,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            isolation_level="read_committed",
            max_partition_fetch_bytes=4 * 1024 * 1024,
            metadata_max_age_ms=5000,  # see processors/app.py: recover quickly from a broker restart
        )

    async def start(self, listener: ConsumerRebalanceListener) -> None:
        await self.admin.start()
        await self.producer.start()
        await self.consumer.start()
        self.consumer.subscribe([EVENTS_TOPIC], listener=listener)

    async def stop(self) -> None:
        await self.consumer.stop()
        await self.producer.stop()
        await self.admin.close()

    async def plans(self, assigned: set[TopicPartition]) -> dict[TopicPartition, Range]:
        """Plans left in the committed metadata of newly assigned partitions: those
        batches may or may not be in ClickHouse and are inserted again, as they were.
        Raises GaveUp when the sink stops while the broker does not answer."""

        async def read() -> tuple[dict, dict]:
            committed = await self.admin.list_consumer_group_offsets(SINK_CLICKHOUSE_GROUP, partitions=list(assigned))
            return committed, await self.consumer.end_offsets(list(assigned))

        # e.g. a broker restart; a plan missed here would mean duplicates
        committed, ends = await retry(read, "reading committed offsets", on=KafkaError, pause=self._pause, logger=log)
        plans = {}
        for tp in assigned:
            meta = committed.get(tp)
            plan = parse_plan(tp.topic, tp.partition, meta.offset, meta.metadata) if meta else None
            if plan is None:
                continue
            if plan.end >= ends[tp]:  # the topic was recreated: the plan names records that are gone
                log.warning("ignoring a plan beyond the end of its partition",
                            extra={"partition": tp.partition, "plan_end": plan.end, "end_offset": ends[tp]})
                continue
            log.info("found a batch planned before a restart; storing it again",
                     extra={"partition": tp.partition, "start": plan.start, "end": plan.end})
            plans[tp] = plan
        return plans

    async def commit(self, offsets: dict[TopicPartition, OffsetAndMetadata]) -> bool:
        """Commit, riding out a broker restart. False when the partitions were taken
        away by a rebalance (their next owner finds the plan and finishes the batch), or
        when the sink stops while the broker does not answer."""
        try:
            await retry(lambda: self.consumer.commit({tp: (om.offset, om.metadata) for tp, om in offsets.items()}),
                        "offset commit", on=KafkaError, unless=lambda exc: isinstance(exc, REFUSED),
                        pause=self._pause, logger=log)
            return True
        except REFUSED as exc:
            log.warning("offset commit refused after a rebalance; the batch is left to the plan",
                        extra={"error": str(exc)})
            return False
        except GaveUp:
            return False

    async def dead_letter(self, rec, index: int, event, reason: str) -> None:
        """The refused event alone (its record may carry others), with where it came from."""
        await self.producer.send_and_wait(
            DEAD_LETTER_TOPIC, event.encode(), key=rec.key,
            headers=deadletter.headers(reason, deadletter.STAGE_SINK, topic=rec.topic, partition=rec.partition,
                                       offset=rec.offset, index=index, ts_ms=int(time.time() * 1000)))
