"""Gap-free, duplicate-free input per partition, whatever the consumer delivers.

Faust's stream, which read the events before consumer.py, acknowledged records it
skipped around a rebalance (records prefetched under the previous consumer
generation), and its commit could then move past records no agent ever saw: seen
here as a jump from offset 2074 to 2081 right after a worker restart. The guard
stays as the check that no record is skipped, whoever reads them. It keeps, in the table (and
so in its changelog), the next offset the processor must apply for each
partition. A record past it is either a legitimate gap (transaction markers,
retention) or a skip: a probe of the broker tells which, and a skip makes the
guard seek the stream back and drop what arrives until the missing record does.
"""

from __future__ import annotations

import time
from typing import Awaitable, Callable, MutableMapping

from quotaflow.processors.window_counts import REDELIVERED

APPLY = "apply"
REFETCH = "refetch"  # dropped now; it will be delivered again after the seek back

RESEEK_AFTER_S = 5.0  # a seek lost in a rebalance is repeated after this long

Probe = Callable[[int, int], Awaitable[int | None]]  # (partition, offset) -> first real offset >= it
Seek = Callable[[int, int], Awaitable[None]]


def next_offset_key(partition: int) -> str:
    """Table key of a partition's next offset. Cannot collide with an api_key_id,
    which starts with a letter or digit."""
    return f"__next_offset__/{partition}"


def partition_of_next_offset(key: str) -> int | None:
    """The partition of a next_offset_key (None for any other key)."""
    prefix = next_offset_key(0)[:-1]
    return int(key[len(prefix):]) if key.startswith(prefix) else None


class OffsetGuard:
    def __init__(self, data: MutableMapping, probe: Probe, seek: Seek, clock: Callable[[], float] = time.monotonic):
        self.data = data
        self._probe = probe
        self._seek = seek
        self._clock = clock
        self._refetching: dict[int, tuple[int, float]] = {}  # partition -> (offset sought, when)
        self._still: dict[int, tuple[int, float]] = {}  # partition -> (next offset, since when unchanged)
        self._overrun: set[int] = set()  # refetching partitions that delivered records past the seek

    def reset(self) -> None:
        """Forget seeks in flight: a rebalance repositions the stream anyway."""
        self._refetching.clear()
        self._still.clear()
        self._overrun.clear()

    async def after_batch(self) -> None:
        """Seek again the partitions that delivered records past their seek in this batch.
        Those records were already on their way when the guard sought (fetched, or queued
        in the stream); the stream now drops anything below them, which would undo the
        seek. Seeking after each such batch instead of waiting RESEEK_AFTER_S repairs a
        skip as soon as the records in flight are through."""
        for partition in self._overrun:
            if partition in self._refetching:
                await self._refetch(partition, self._refetching[partition][0])
        self._overrun.clear()

    async def reseek_stale(self) -> None:
        """Repeat seeks that have not brought the missing record back: a rebalance
        or records drained just before the seek can undo one. Also run on a timer,
        so a quiet partition does not wait for new traffic."""
        now = self._clock()
        for partition, (sought, when) in list(self._refetching.items()):
            if now - when > RESEEK_AFTER_S:
                await self._refetch(partition, sought)

    async def unstick(self, ends: dict[int, int]) -> None:
        """Seek partitions that have records to read (next offset < end offset) but have
        not moved for RESEEK_AFTER_S. The stream drops records below the highest offset
        it has delivered, so records it delivered past a seek can make it drop the ones
        the seek brought back; with no later traffic to notice the gap, the partition
        would wait forever. Given {partition: end offset} of the assigned partitions;
        run on a timer."""
        now = self._clock()
        for partition, end in ends.items():
            expected = self.data.get(next_offset_key(partition))
            if expected is None or expected >= end:
                self._still.pop(partition, None)
                continue
            seen = self._still.get(partition)
            if seen is None or seen[0] != expected:
                self._still[partition] = (expected, now)
            elif now - seen[1] >= RESEEK_AFTER_S:
                await self._refetch(partition, expected)
                self._still[partition] = (expected, now)

    def backlog(self, ends: dict[int, int], starts: dict[int, int]) -> int:
        """Records not applied yet, by this guard's own next offsets: unlike the group's
        committed offsets, it also counts records the stream skipped and will fetch again.
        Given {partition: end offset} and {partition: first offset still in the log}. A
        partition none of whose records was ever applied (the table, recovered from its
        changelog, holds no next offset for it) has all of them still to apply."""
        total = 0
        for partition, end in ends.items():
            expected = self.data.get(next_offset_key(partition))
            total += max(end - (starts.get(partition, 0) if expected is None else expected), 0)
        return total

    def quick(self, partition: int, offset: int) -> str | None:
        """The verdict for the common case, without a coroutine: the next record
        (APPLY) or an old one (REDELIVERED); None when check() must look closer."""
        key = next_offset_key(partition)
        expected = self.data.get(key)
        if expected is None or offset == expected:
            if self._refetching:
                self._refetching.pop(partition, None)
            self.data[key] = offset + 1
            return APPLY
        if offset < expected:
            return REDELIVERED
        return None

    async def check(self, partition: int, offset: int) -> str:
        key = next_offset_key(partition)
        expected = self.data.get(key)
        if expected is None or offset == expected:
            self._refetching.pop(partition, None)
            self.data[key] = offset + 1
            return APPLY
        if offset < expected:
            return REDELIVERED
        if partition in self._refetching:
            self._overrun.add(partition)
            await self.reseek_stale()
            return REFETCH
        first = await self._probe(partition, expected)
        if first is not None and first >= offset:  # nothing real in between: a legitimate gap
            self.data[key] = offset + 1
            return APPLY
        target = expected if first is None else first
        self.data[key] = target
        await self._refetch(partition, target)
        return REFETCH

    async def _refetch(self, partition: int, offset: int) -> None:
        """Seek the stream back to offset, and remember when, to repeat it if it is undone."""
        self._refetching[partition] = (offset, self._clock())
        await self._seek(partition, offset)
