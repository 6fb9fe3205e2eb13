"""The processor's own Kafka producer, for its changelog records and dead letters.

Faust's producer path sends records one by one through its buffer; a batch that
touches thousands of keys spent most of its time there. This producer appends
them all at once (idempotent, batched, lingering a few ms) and hands back the
delivery futures, which the batch awaits before it is acknowledged. Faust still
reads the changelog topic to recover the table: it does not care who wrote it.
"""

from __future__ import annotations

import asyncio

import orjson
from aiokafka import AIOKafkaProducer


class Output:
    def __init__(self, bootstrap: str, changelog_topic: str, dead_letter_topic: str):
        self.changelog_topic = changelog_topic
        self.dead_letter_topic = dead_letter_topic
        self._producer = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=True, linger_ms=5,
                                          max_batch_size=512 * 1024, compression_type="zstd")

    async def start(self) -> None:
        await self._producer.start()

    async def stop(self) -> None:
        await self._producer.stop()

    async def changelog(self, key: str, state: dict | int | None, partition: int) -> asyncio.Future:
        """A table record, encoded as Faust reads its changelog back (key and value both
        JSON: a raw key fails its recovery, which then skips the record); None deletes the key."""
        value = None if state is None else orjson.dumps(state)
        return await self._producer.send(self.changelog_topic, value=value, key=orjson.dumps(key), partition=partition)

    async def dead_letter(self, key: bytes | None, value: bytes | None, headers: list) -> asyncio.Future:
        return await self._producer.send(self.dead_letter_topic, value=value, key=key, headers=headers)
