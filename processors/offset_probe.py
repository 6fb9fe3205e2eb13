"""Asks the broker which record really comes next in a partition (for OffsetGuard), and
where each partition ends (for the backlog gauge)."""

from __future__ import annotations

from aiokafka import AIOKafkaConsumer, TopicPartition


class OffsetProbe:
    def __init__(self, bootstrap: str, topic: str):
        self.topic = topic
        self._consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                                          auto_offset_reset="earliest")

    async def start(self) -> None:
        await self._consumer.start()

    async def stop(self) -> None:
        await self._consumer.stop()

    async def end_offsets(self, partitions: list[int]) -> dict[int, int]:
        got = await self._consumer.end_offsets([TopicPartition(self.topic, p) for p in partitions])
        return {tp.partition: offset for tp, offset in got.items()}

    async def start_offsets(self, partitions: list[int]) -> dict[int, int]:
        """The first offset each partition still holds (after retention)."""
        got = await self._consumer.beginning_offsets([TopicPartition(self.topic, p) for p in partitions])
        return {tp.partition: offset for tp, offset in got.items()}

    async def first_offset(self, partition: int, offset: int) -> int | None:
        tp = TopicPartition(self.topic, partition)
        self._consumer.assign([tp])
        self._consumer.seek(tp, offset)
        for _ in range(10):
            records = (await self._consumer.getmany(tp, timeout_ms=500, max_records=1)).get(tp)
            if records:
                return records[0].offset
        return None
