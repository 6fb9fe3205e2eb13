"""Silences on their compacted topic (schemas/topics.py ALERT_SILENCES_TOPIC): one record per
silence, keyed by "<org>/<silence id>" ("*" for every org), a tombstone when removed. The
alerts stage follows the topic (alerts/sources.py); `quotaflow alerts silences` writes it."""

from __future__ import annotations

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError
from pydantic import ValidationError

from quotaflow.alerts.rules import RuleStore
from quotaflow.core.errors import OperatorError
from quotaflow.core.redact import redact
from quotaflow.schemas.alert_rules import Silence
from quotaflow.schemas.topics import ALERT_SILENCES_TOPIC


def silence_key(org_id: str, silence_id: str) -> bytes:
    return f"{org_id}/{silence_id}".encode()


class SilenceStore:
    def __init__(self, bootstrap: str, topic: str = ALERT_SILENCES_TOPIC):
        self.bootstrap, self.topic = bootstrap, topic

    def _unreachable(self, exc: Exception) -> OperatorError:
        return OperatorError(f"cannot reach Kafka at {redact(self.bootstrap)}: {redact(exc) or type(exc).__name__}")

    async def read(self) -> dict[tuple[str, str], Silence]:
        """Every silence the topic holds (ended ones too, until removed), by (org, id)."""
        consumer = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, enable_auto_commit=False,
                                    request_timeout_ms=15_000)
        try:
            await consumer.start()
        except KafkaError as exc:
            raise self._unreachable(exc) from None
        out: dict[tuple[str, str], Silence] = {}
        try:
            numbers = await RuleStore(self.bootstrap, self.topic)._partitions()  # as the rules are read
            if not numbers:
                raise OperatorError(f"the topic {self.topic} does not exist: `quotaflow stack up` creates it")
            tps = [TopicPartition(self.topic, p) for p in numbers]
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            ends = await consumer.end_offsets(tps)
            while any([await consumer.position(tp) < ends[tp] for tp in tps]):
                for tp, records in (await consumer.getmany(*tps, timeout_ms=1000)).items():
                    for record in records:
                        if record.offset < ends[tp]:
                            self._apply(out, record)
        except KafkaError as exc:
            raise self._unreachable(exc) from None
        finally:
            await consumer.stop()
        return out

    @staticmethod
    def _apply(out: dict[tuple[str, str], Silence], record) -> None:
        org, _, sid = (record.key or b"").decode(errors="replace").partition("/")
        if record.value is None:
            out.pop((org, sid), None)
            return
        try:
            out[(org, sid)] = Silence.model_validate_json(record.value)
        except ValidationError:
            pass  # not a silence: the stage skips it too

    async def _send(self, key: bytes, value: bytes | None) -> None:
        producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap, acks="all", enable_idempotence=True,
                                    request_timeout_ms=15_000)
        try:
            await producer.start()
            await producer.send_and_wait(self.topic, value, key=key)
        except KafkaError as exc:
            raise self._unreachable(exc) from None
        finally:
            await producer.stop()

    async def put(self, silence: Silence) -> None:
        await self._send(silence_key(silence.org_id, silence.silence_id), silence.model_dump_json().encode())

    async def remove(self, org_id: str, silence_id: str) -> Silence:
        existing = (await self.read()).get((org_id, silence_id))
        if existing is None:
            raise OperatorError(f"no silence {silence_id} for {'every org' if org_id == '*' else 'org ' + org_id}")
        await self._send(silence_key(org_id, silence_id), None)
        return existing
