"""Batch selection: the records fetched from Kafka, held per partition until they make
a batch of one partition's offset range (pure logic, no I/O).

A partition gives a batch when its buffer holds the batch size in records or bytes, or
its oldest record has waited the batch time; a partition with a plan left by a crash
or a rebalance (plans.py) gives exactly the planned range, once all of it is in. No
batch is taken from a partition before its plans are read: aiokafka fetches a newly
assigned partition before the rebalance listener has read them, and a batch taken
then would ignore a plan.
"""

from __future__ import annotations

from typing import NamedTuple

from aiokafka import TopicPartition

from quotaflow.sinks.clickhouse.plans import Range


class Batch(NamedTuple):
    range: Range
    records: list  # the Kafka records of the range, invalid ones included
    replay: bool  # True: the range of a plan found after a restart, already committed as a plan


class Ready(NamedTuple):
    """A batch a partition can give now: its range, how many buffered records it takes,
    whether it replays a plan."""

    range: Range
    records: int
    replay: bool


class Buffers:
    def __init__(self, batch_size: int, batch_bytes: int, batch_seconds: float):
        self.batch_size = batch_size
        self.batch_bytes = batch_bytes
        self.batch_seconds = batch_seconds
        self._buffers: dict[TopicPartition, list] = {}
        self._bytes: dict[TopicPartition, int] = {}  # record value bytes held in each buffer
        self._first_at: dict[TopicPartition, float] = {}  # when the oldest buffered record arrived
        self._replays: dict[TopicPartition, Range] = {}  # plans found in the committed metadata
        self._planned: set[TopicPartition] = set()  # assigned partitions whose plans are read

    @classmethod
    def from_settings(cls, settings) -> "Buffers":
        return cls(settings.sink_batch_size, settings.sink_batch_bytes, settings.sink_batch_seconds)

    # --- what comes in -------------------------------------------------------------

    def add(self, tp: TopicPartition, records: list, now: float) -> None:
        """Records fetched from a partition, in offset order."""
        buf = self._buffers.setdefault(tp, [])
        if not buf:
            self._first_at[tp] = now
        buf.extend(records)
        self._bytes[tp] = self._bytes.get(tp, 0) + sum(_size(rec) for rec in records)

    def replay(self, tp: TopicPartition, plan: Range) -> bool:
        """A plan found for a partition: its next batch is the planned range. True when
        the buffer held records from elsewhere, now dropped: the caller seeks the
        partition back to the plan's start."""
        self._replays[tp] = plan
        buf = self._buffers.get(tp)
        if buf and buf[0].offset != plan.start:
            self._buffers[tp], self._bytes[tp] = [], 0
            return True
        return False

    def plans_read(self, tps: set[TopicPartition]) -> None:
        """The plans of these partitions are read: batches may be taken from them now."""
        self._planned |= tps

    def forget(self, tps: set[TopicPartition]) -> None:
        """Partitions revoked: what they held is read again by their next owner."""
        for tp in tps:
            self._buffers.pop(tp, None)
            self._bytes.pop(tp, None)
            self._first_at.pop(tp, None)
            self._replays.pop(tp, None)
        self._planned -= tps

    # --- what goes out -------------------------------------------------------------

    def ready(self, now: float) -> dict[TopicPartition, Ready]:
        """Per partition with a batch to store now, that batch. Only looks; take takes it."""
        out = {}
        size, max_bytes = self.batch_size, self.batch_bytes
        for tp, buf in self._buffers.items():
            if not buf or tp not in self._planned:
                continue
            plan = self._replays.get(tp)
            if plan is not None:
                if buf[-1].offset >= plan.end:  # else the rest of the planned range is still to come
                    out[tp] = Ready(plan, sum(1 for rec in buf if rec.offset <= plan.end), True)
            elif (len(buf) >= size or self._bytes.get(tp, 0) >= max_bytes
                  or now - self._first_at[tp] >= self.batch_seconds):
                n = _prefix(buf, size, max_bytes)
                out[tp] = Ready(Range(tp.topic, tp.partition, buf[0].offset, buf[n - 1].offset), n, False)
        return out

    def take(self, tp: TopicPartition, ready: Ready, now: float) -> Batch:
        """The batch ``ready`` (from ready()) describes, out of the buffer."""
        buf = self._buffers[tp]
        n = ready.records
        batch = Batch(ready.range, buf[:n], ready.replay)
        self._bytes[tp] -= sum(_size(rec) for rec in buf[:n])
        del buf[:n]
        self._first_at[tp] = now
        if ready.replay:
            del self._replays[tp]  # its records are all in this batch
        return batch

    def next_batch(self, now: float) -> tuple[TopicPartition, Batch] | None:
        """The batch of the partition waiting longest, of those ready, taken."""
        ready = self.ready(now)
        if not ready:
            return None
        tp = min(ready, key=self._first_at.__getitem__)
        return tp, self.take(tp, ready[tp], now)

    # --- how full ------------------------------------------------------------------

    def records(self, tp: TopicPartition) -> list:
        """The records buffered for a partition, in offset order."""
        return list(self._buffers.get(tp, ()))

    def plan(self, tp: TopicPartition) -> Range | None:
        """The plan a partition's next batch replays, if any."""
        return self._replays.get(tp)

    def count(self) -> int:
        """Records buffered, all partitions."""
        return sum(len(b) for b in self._buffers.values())

    def size(self) -> int:
        """Record value bytes buffered, all partitions."""
        return sum(self._bytes.values())

    def replay_waiting(self) -> bool:
        """A plan to replay whose partition may give it once its records are all in."""
        return any(tp in self._planned for tp in self._replays)

    def next_deadline(self) -> float | None:
        """When the oldest buffered record of any partition has waited the batch time."""
        return min((self._first_at[tp] + self.batch_seconds for tp, buf in self._buffers.items() if buf),
                   default=None)


def _size(rec) -> int:
    return len(rec.value or b"")


def _prefix(buf: list, max_records: int, max_bytes: int) -> int:
    """How many of the buffered records the next batch takes: up to max_records and
    max_bytes (at least one: a record larger than max_bytes goes alone)."""
    total = 0
    for n, rec in enumerate(buf[:max_records]):
        total += _size(rec)
        if total > max_bytes and n:
            return n
    return min(len(buf), max_records)
