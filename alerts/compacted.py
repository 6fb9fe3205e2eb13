"""A compacted topic read whole and written a record at a time, as the CLI keeps the alert
rules and silences (one record per key, a tombstone when removed; the last record of each
key wins). The alerts stage follows these topics itself (sources.py)."""

from __future__ import annotations

from typing import Any, Callable

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from quotaflow.core.errors import OperatorError
from quotaflow.core.redact import redact

TIMEOUT_MS = 15_000


class CompactedTopic:
    def __init__(self, bootstrap: str, topic: str):
        self.bootstrap, self.topic = bootstrap, topic

    def _unreachable(self, exc: Exception) -> OperatorError:
        return OperatorError(f"cannot reach Kafka at {redact(self.bootstrap)}: {redact(exc) or type(exc).__name__}")

    async def _partitions(self) -> list[int]:
        admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap, request_timeout_ms=TIMEOUT_MS)
        await admin.start()
        try:
            (desc,) = await admin.describe_topics([self.topic])
        finally:
            await admin.close()
        return [] if desc.get("error_code") else sorted(p["partition"] for p in desc["partitions"])

    async def _read_all(self, apply: Callable[[Any], None]) -> None:
        """``apply`` each record from the start to the topic's end as of now, in order."""
        consumer = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, enable_auto_commit=False,
                                    request_timeout_ms=TIMEOUT_MS)
        try:
            await consumer.start()
        except KafkaError as exc:
            raise self._unreachable(exc) from None
        try:
            numbers = await self._partitions()
            if not numbers:
                raise OperatorError(f"the topic {self.topic} does not exist: `quotaflow stack up` creates it "
                                    "(or create it compacted on your cluster)")
            tps = [TopicPartition(self.topic, p) for p in numbers]
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            ends = await consumer.end_offsets(tps)
            while any([await consumer.position(tp) < ends[tp] for tp in tps]):
                for tp, records in (await consumer.getmany(*tps, timeout_ms=1000)).items():
                    for record in records:
                        if record.offset < ends[tp]:
                            apply(record)
        except KafkaError as exc:
            raise self._unreachable(exc) from None
        finally:
            await consumer.stop()

    async def _send(self, key: bytes, value: bytes | None) -> None:
        """One record (None: a tombstone), acknowledged by every in-sync replica."""
        producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap, acks="all", enable_idempotence=True,
                                    request_timeout_ms=TIMEOUT_MS)
        try:
            await producer.start()
            await producer.send_and_wait(self.topic, value, key=key)
        except KafkaError as exc:
            raise self._unreachable(exc) from None
        finally:
            await producer.stop()
