"""The processor's own Kafka producer, for its changelog records, dead letters and
forwarded records.

A batch that touches thousands of keys changes thousands of table entries: this
producer appends them all at once (idempotent, batched, lingering a few ms) and hands
back what it sent, which the batch delivers (``deliver``) before its offsets are
committed. table.py reads the changelog back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

import orjson
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from quotaflow.core.retry import retry
from quotaflow.processors import stopping

log = logging.getLogger(__name__)

# How long a delivery may go unanswered before its records count as failed (and are sent
# again through a new producer).
DELIVERY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 5.0


@dataclass(slots=True)
class Sent:
    """A record handed to the producer, and the future of its delivery."""

    topic: str
    key: bytes | None
    value: bytes | None
    partition: int | None
    headers: list | None
    future: asyncio.Future | None  # None only while its batch is being filled (changelogs)


class NotDelivered(Exception):
    """Records the broker did not take: the first one's error, and where they were going."""

    def __init__(self, failed: list[Sent]):
        first = failed[0].future
        error = ("cancelled" if first.cancelled() else f"no answer in {DELIVERY_TIMEOUT_S:g} s" if not first.done()
                 else repr(first.exception()))
        super().__init__(f"{len(failed)} records to {sorted({s.topic for s in failed})}: {error}")


class Output:
    def __init__(self, bootstrap: str, changelog_topic: str, dead_letter_topic: str, events_topic: str):
        self.changelog_topic = changelog_topic
        self.dead_letter_topic = dead_letter_topic
        self.events_topic = events_topic
        self._bootstrap = bootstrap
        self._producer = self._new_producer()

    def _new_producer(self) -> AIOKafkaProducer:
        return AIOKafkaProducer(bootstrap_servers=self._bootstrap, enable_idempotence=True, linger_ms=5,
                                max_batch_size=512 * 1024, compression_type="zstd")

    async def start(self) -> None:
        await self._producer.start()

    async def _renew(self) -> None:
        """A new producer (a new producer id) in place of one whose delivery failed:
        aiokafka's idempotent producer answers OutOfOrderSequenceNumber to everything after
        a batch it gave up on (a broker restart), for ever; its sender task may even be gone."""
        await self._stop(self._producer)
        producer = self._new_producer()
        await producer.start()  # KafkaError when the broker is still away: tried again next attempt
        self._producer = producer
        log.info("kafka producer renewed after a failed delivery")

    @staticmethod
    async def _stop(producer: AIOKafkaProducer) -> None:
        """Stop a producer within STOP_TIMEOUT_S: its stop waits for its batches, for ever
        when its sender task is stuck or the broker gone (they are sent again anyway)."""
        stopping = asyncio.create_task(producer.stop())
        done, _ = await asyncio.wait([stopping], timeout=STOP_TIMEOUT_S)
        if not done:
            sender = getattr(getattr(producer, "_sender", None), "sender_task", None)
            if sender is not None:
                sender.cancel()
        with contextlib.suppress(asyncio.CancelledError, asyncio.TimeoutError, Exception):
            await asyncio.wait_for(stopping, STOP_TIMEOUT_S)

    async def events_partitions(self) -> int:
        """Partitions of the events topic, from the cluster's metadata."""
        return len(await self._producer.partitions_for(self.events_topic))

    async def changelog_partitions(self) -> int:
        """Partitions of the changelog topic; 0 when the cluster does not know it."""
        try:
            return len(await asyncio.wait_for(self._producer.partitions_for(self.changelog_topic), 30))
        except (KafkaError, asyncio.TimeoutError):
            return 0

    def known_events_partitions(self) -> int | None:
        """The same, from the metadata at hand (refreshed by the client), without waiting."""
        partitions = self._producer.client.cluster.partitions_for_topic(self.events_topic)
        return len(partitions) if partitions else None

    async def stop(self) -> None:
        await self._stop(self._producer)

    @staticmethod
    def encode_changelogs(records: list[tuple[str, dict | int | None, int]]) -> list[tuple[bytes, bytes | None, int]]:
        """Table records (key, state, partition), encoded as table.py reads them back (key and
        value both JSON, as the Faust table before it wrote them; None deletes the key): the
        states as they stand now, whatever later batches do to them."""
        return [(orjson.dumps(key), None if state is None else orjson.dumps(state), partition)
                for key, state, partition in records]

    async def send_changelogs(self, records: list[tuple[bytes, bytes | None, int]]) -> list[Sent]:
        """Encoded table records, in their order per partition, appended to one record batch
        per partition and sent as such: a batch changes thousands of subjects, and a send per
        record cost more than the rest of the batch's work on them."""
        sent: list[Sent] = []
        open_batches: dict[int, tuple[object, list[Sent]]] = {}  # partition -> (its batch, its records)
        for key_bytes, value, partition in records:
            entry = open_batches.get(partition)
            if entry is None or entry[0].append(timestamp=None, key=key_bytes, value=value) is None:
                if entry is not None:  # full: on its way, and a new one for the rest
                    await self._send_batch(*entry, partition)
                entry = open_batches[partition] = (self._producer.create_batch(), [])
                if entry[0].append(timestamp=None, key=key_bytes, value=value) is None:
                    raise ValueError(f"a table record of {len(value or b'')} bytes exceeds the producer's batch size")
            record = Sent(self.changelog_topic, key_bytes, value, partition, None, None)  # its future: its batch's
            entry[1].append(record)
            sent.append(record)
        for partition, entry in open_batches.items():
            await self._send_batch(*entry, partition)
        return sent

    async def _send_batch(self, batch: object, records: list[Sent], partition: int) -> None:
        try:
            future = await self._producer.send_batch(batch, self.changelog_topic, partition=partition)
        except KafkaError as exc:  # sent again one by one by deliver, as any failed record
            future = asyncio.get_running_loop().create_future()
            future.set_exception(exc)
        for record in records:
            record.future = future

    async def dead_letter(self, key: bytes | None, value: bytes | None, headers: list) -> Sent:
        return await self._send(self.dead_letter_topic, key, value, None, headers)

    async def forward(self, key: bytes, value: bytes, partition: int, headers: list) -> Sent:
        """Events to the partition of the events topic where their org is counted."""
        return await self._send(self.events_topic, key, value, partition, headers)

    async def deliver(self, sent: list[Sent]) -> None:
        """Return once every record is on the broker. Records that failed (a leader
        moving, a topic just created, a broker restarting) are sent again in their order,
        with backoff, until they are (or the processor stops: stopping.Stopped): a batch
        is never acknowledged with its output lost."""
        failed: list[Sent] = []

        async def attempt() -> None:
            nonlocal sent, failed
            if failed:  # the last attempt's failures, sent again in their order, by a new producer
                try:
                    await self._renew()
                except KafkaError as exc:
                    log.warning("kafka producer not renewed yet", extra={"error": repr(exc)})
                    raise NotDelivered(failed) from None
                sent = [await self._send(s.topic, s.key, s.value, s.partition, s.headers) for s in failed]
            await asyncio.wait([s.future for s in sent], timeout=DELIVERY_TIMEOUT_S)
            failed = [s for s in sent
                      if not s.future.done() or s.future.cancelled() or s.future.exception() is not None]
            if failed:
                raise NotDelivered(failed)

        if sent:
            await retry(attempt, "delivering records to the broker", on=NotDelivered, pause=stopping.pause,
                        logger=log)

    async def _send(self, topic: str, key: bytes | None, value: bytes | None, partition: int | None,
                    headers: list | None) -> Sent:
        try:
            future = await self._producer.send(topic, value=value, key=key, partition=partition, headers=headers)
        except KafkaError as exc:  # e.g. no metadata for the topic yet: counts as a failed delivery
            future = asyncio.get_running_loop().create_future()
            future.set_exception(exc)
        return Sent(topic, key, value, partition, headers, future)
