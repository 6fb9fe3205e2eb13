"""The events topic's consumer: the processor's membership in its group, the table of the
partitions it is assigned recovered before it counts on them, batches handed to
RequestCounter, offsets committed.

An aiokafka consumer of its own rather than a Faust stream: Faust hands each record over on
its own (tasks, queues, sensors and an acknowledgement per record), 120 to 350 µs a record
here, so a topic of single-event records (what kcat and most non-Python producers publish)
was counted at 3 to 5 thousand records/s. ``getmany`` hands over what has arrived, at once.

Guarantee, as before: a batch's offsets are committed only after its finish has returned
(RequestCounter.count: its counts in Redis, its changelog on the broker); a record read
again after a crash or a rebalance is recognised by the table. Batches are counted and
finish in order. A rebalance waits for the batches in progress (the batch lock), counts
and finishes them, and commits them before the partitions are given up, so the next
owner starts where this one ended; records fetched before a rebalance and not yet handled
are dropped, and read again from the committed offsets by whoever owns them after it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Awaitable, Callable, Sequence

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError, RebalanceInProgressError

from quotaflow.core.settings import Settings
from quotaflow.schemas.topics import EVENTS_TOPIC, PROCESSOR_EVENTS_GROUP

log = logging.getLogger(__name__)

SESSION_TIMEOUT_S = 15.0  # a member killed without leaving holds its partitions this long
FETCH_WAIT_MS = 100  # getmany's wait when nothing has arrived: how long a stop or a rebalance may wait on it
# Records in a batch at most, whatever they carry: as many as the default batch holds events,
# so a backlog of one-event records is taken in batches as large as a batched one. A key's
# writes (its decision, its counts, their Redis script) cost the same for one event as for
# many, and in a large batch most keys have several.
MAX_BATCH_RECORDS = 20_000

# (partitions assigned now, those of them new to this process) -> None, before any batch of them
OnAssigned = Callable[[set[int], set[int]], Awaitable[None]]
Finish = Callable[[], Awaitable[None]]  # a counted batch's writes: returns once they are acknowledged


class EventsConsumer(ConsumerRebalanceListener):
    def __init__(self, settings: Settings, on_assigned: OnAssigned):
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=settings.kafka_bootstrap,
            group_id=PROCESSOR_EVENTS_GROUP,
            client_id=f"{PROCESSOR_EVENTS_GROUP}-{settings.processor_metrics_port or 'unnumbered'}",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            session_timeout_ms=int(SESSION_TIMEOUT_S * 1000),
            heartbeat_interval_ms=1000,
            rebalance_timeout_ms=int(settings.processor_rebalance_timeout_s * 1000),
            # After a broker restart the first rebalance can see topics without leaders and
            # assign nothing; fresh metadata within seconds makes the leader rebalance again.
            metadata_max_age_ms=5000,
            max_partition_fetch_bytes=8 * 1024 * 1024,
        )
        self.batch_events = settings.processor_batch_events
        # Events per record of late, which sizes a batch in records: it starts at what an
        # emitter's record holds, rises at once and halves with each batch at most.
        self._events_per_record = float(settings.collector_batch_events)
        self.commit_interval_s = settings.processor_commit_interval_s
        self.generation = -1  # the group generation the partitions were assigned in
        self.owned: set[int] = set()
        self._on_assigned = on_assigned
        self._lock = asyncio.Lock()  # held while a batch is handled; a rebalance waits for it
        self._rebalances = 0  # counted under the lock: records fetched before one are not handled
        self._pending: dict[TopicPartition, int] = {}  # offsets handled, not committed yet
        self._committed_at = time.monotonic()
        self._failed: BaseException | None = None  # a recovery that failed: nothing more is counted
        self._revoking = False  # a rebalance waits for the batch in progress
        self._batch_start: dict[TopicPartition, int] = {}  # the batch finishing: its first offsets
        self._finishing: tuple[asyncio.Future, dict[TopicPartition, int]] | None = None  # and its next offsets
        # The batch read, not counted yet: (what read answered, its records, its first and next offsets)
        self._reading: tuple[Any, int, dict[TopicPartition, int], dict[TopicPartition, int]] | None = None
        self._count_batch: Callable[[Any], Awaitable[tuple[int, Finish]]] | None = None  # run's count, for rebalances

    async def start(self) -> None:
        self.consumer.subscribe([EVENTS_TOPIC], listener=self)
        await self.consumer.start()

    async def stop(self) -> None:
        await self.consumer.stop()

    def live_generation(self) -> int | None:
        """The group generation the consumer is in now (-1 once the group expelled it)."""
        coordinator = getattr(self.consumer, "_coordinator", None)
        return None if coordinator is None else coordinator.generation

    def assigned(self) -> list[int]:
        return [tp.partition for tp in self.consumer.assignment() if tp.topic == EVENTS_TOPIC]

    async def seek(self, partition: int, offset: int) -> None:
        """Read ``partition`` again from ``offset`` (OffsetGuard). A partition given up
        meanwhile cannot be sought: its next owner starts from the committed offset."""
        log.warning("records skipped; seeking back", extra={"partition": partition, "offset": offset})
        try:
            self.consumer.seek(TopicPartition(EVENTS_TOPIC, partition), offset)
        except (IllegalStateError, AssertionError) as exc:
            log.warning("seek failed; it will be repeated", extra={"partition": partition, "error": repr(exc)})

    async def run(self, read: Callable[[Sequence[Any]], Awaitable[Any]],
                  count: Callable[[Any], Awaitable[tuple[int, Finish]]]) -> None:
        """Hand every batch to ``read`` then ``count`` (RequestCounter's: how many events it
        held, and its finish) until cancelled, or a batch fails. Three batches may be on
        their way at once, each at another step: while one finishes (its Redis writes and
        changelog on their way) the next is counted, and while that one's duplicate check
        runs in Redis the one after it is read, if it has arrived already and the stream is
        behind (the batch read was full: a batch that took all there was is counted at once,
        not held for the next). Each step waits for the batch before: batches are counted and
        finish in order."""
        self._count_batch = count
        try:
            while True:
                if self._failed is not None:
                    raise self._failed
                seen = self._rebalances
                max_records = min(max(1, int(self.batch_events / self._events_per_record)), MAX_BATCH_RECORDS)
                # A batch read waits for the next only if that one is here already.
                wait_ms = 0 if self._reading is not None else FETCH_WAIT_MS
                fetched = await self.consumer.getmany(timeout_ms=wait_ms, max_records=max_records)
                if not fetched:
                    if self._reading is not None or self._finishing is not None or self._pending:
                        async with self._lock:  # the last batches' offsets, once no more come
                            await self._count(count)
                            await self._settle()
                            if time.monotonic() - self._committed_at >= self.commit_interval_s:
                                await self._commit()
                    continue
                async with self._lock:
                    if self._rebalances != seen:  # fetched under the previous assignment: read again after it
                        continue
                    records = [record for batch in fetched.values() for record in batch]
                    reading = await read(records)
                    await self._count(count)  # the batch before
                    self._reading = (reading, len(records), {tp: batch[0].offset for tp, batch in fetched.items()},
                                     {tp: batch[-1].offset + 1 for tp, batch in fetched.items()})
                    if len(records) < max_records:  # all there was: no backlog to read ahead in
                        await self._count(count)
                    if time.monotonic() - self._committed_at >= self.commit_interval_s:
                        await self._commit()
        finally:
            if self._reading is not None:  # read only: dropped with the process, read again after it
                self._reading[0].cancel()
                self._reading = None
            if self._finishing is not None:  # left unacknowledged: read again, and recognised
                self._finishing[0].cancel()
                self._finishing = None

    async def _count(self, count: Callable[[Any], Awaitable[tuple[int, Finish]]]) -> None:
        """Count the batch read, if any, and start its finish once the one before has finished."""
        if self._reading is None:
            return
        (reading, records, start, offsets), self._reading = self._reading, None
        events, finish = await count(reading)
        self._events_per_record = max(max(events / records, 1.0), self._events_per_record / 2)
        await self._settle()
        self._batch_start = start
        self._finishing = (asyncio.ensure_future(finish()), offsets)

    async def _settle(self) -> None:
        """Wait for the batch finishing, if any: its offsets then become committable. One
        that failed fails the consumer: nothing more is counted."""
        if self._finishing is None:
            return
        task, offsets = self._finishing
        try:
            await asyncio.shield(task)  # a rebalance cancelled meanwhile leaves the batch to finish
        except BaseException as exc:
            if task.done():
                self._finishing = None
                self._failed = self._failed or (exc if isinstance(exc, Exception) else None)
            raise
        self._finishing = None
        self._pending.update(offsets)

    async def confirm_membership(self) -> bool:
        """Whether this consumer is still a member of the group, asked of the group when a
        rebalance is waiting for the batch in progress. A rebalance goes on without a member
        that has not rejoined within the rebalance timeout, and the member learns of it at
        its next heartbeat: a batch held up that long (a Redis only it cannot reach) must
        not write after another member took its partitions. An offset commit under the
        generation it was assigned in tells: refused for a rebalance in progress, it is
        still a member (the group waits for it); refused as unknown, it is not."""
        if not self._revoking:
            return True
        try:
            await self.consumer.commit(dict(self._batch_start))
        except CommitFailedError as exc:
            return isinstance(exc.__cause__, RebalanceInProgressError)
        except KafkaError as exc:  # not known either way: not a member, to be safe
            log.warning("group membership not confirmed", extra={"error": repr(exc)})
            return False
        return True

    async def _commit(self) -> None:
        offsets, self._pending = self._pending, {}
        self._committed_at = time.monotonic()
        if not offsets:
            return
        try:
            await self.consumer.commit(offsets)
        except KafkaError as exc:  # a rebalance under way, a broker away: read again, and recognised
            log.warning("offsets not committed", extra={"error": repr(exc)})

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        self._revoking = True
        async with self._lock:  # the batches in progress first: the one read is counted and finished too
            try:
                if self._count_batch is not None:
                    await self._count(self._count_batch)
                await self._settle()
            except Exception as exc:  # aiokafka would log it and go on; run() raises it
                log.warning("the batch in progress failed during a rebalance", extra={"error": repr(exc)})
                self._failed = self._failed or exc
            finally:
                self._revoking = False
            self._rebalances += 1
            await self._commit()

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        partitions = {tp.partition for tp in assigned if tp.topic == EVENTS_TOPIC}
        async with self._lock:
            if self._reading is not None or self._finishing is not None:
                # A revocation counts and finishes them first; without one, this process no
                # longer knows what its table holds: it ends, and recovers it.
                self._failed = self._failed or RuntimeError("partitions assigned with a batch in progress")
            self._rebalances += 1
            self._pending.clear()
            previous, self.generation = self.generation, self.live_generation() or -1
            # A partition kept from the generation before is as this process left it. After a
            # gap (the group went on without it for a while) another may have counted on
            # any of them: all are read back.
            kept = self.owned if self.generation == previous + 1 else set()
            try:
                await self._on_assigned(partitions, partitions - kept)
            except Exception as exc:  # aiokafka would log it and go on: counting on a table not recovered
                self._failed = exc
                self.owned = set()
                raise
            self.owned = partitions
