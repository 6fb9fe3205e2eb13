"""The sink's loop: records fetched into the buffers (batches.py) while batches go
through a pipeline of three: a batch is decoded (in a thread) while the one before it
is checked for duplicates (in Redis, its orgs' tiers read meanwhile) and the one before
that is stored (planned, inserted, committed; the commit of its end also commits the
plan of the next batch). The engine releases the GIL, so decoding and inserting overlap,
and records keep being fetched meanwhile. One decode at a time: several would only
contend for the GIL.

Backpressure: the buffers are bounded (records and bytes); the batches in the
pipeline are held besides them, so memory stays bounded however slowly ClickHouse
takes them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass

from aiokafka import ConsumerRebalanceListener, TopicPartition
from aiokafka.structs import OffsetAndMetadata
from clickhouse_connect.driver.client import Client
from redis.exceptions import RedisError

from quotaflow.core.retry import GaveUp, Pause, retry
from quotaflow.core.settings import Settings
from quotaflow.schemas.dedup import DuplicateCheck, Prepared
from quotaflow.schemas.events import time_bounds_from_settings
from quotaflow.sinks.clickhouse import duplicates, repair
from quotaflow.sinks.clickhouse.batches import Batch, Buffers
from quotaflow.sinks.clickhouse.inserts import INSERT_RETRY_MAX_S, Inserter
from quotaflow.sinks.clickhouse.kafka_side import KafkaSide
from quotaflow.sinks.clickhouse.metrics import BUFFERED, DEDUP_FAILURES, EVENTS, READY, REPAIRS, REPLAYS, STEP_SECONDS
from quotaflow.sinks.clickhouse.plans import Range
from quotaflow.sinks.clickhouse.rows import Rows, to_rows
from quotaflow.sinks.clickhouse.tier_cache import TierCache

log = logging.getLogger(__name__)

DEPTH = 3  # batches in flight: decoded, checked for duplicates, stored


@dataclass(slots=True)
class Pending:
    """A batch taken from the buffers, on its way to ClickHouse."""

    tp: TopicPartition
    batch: Batch
    decoded: asyncio.Future  # (its Rows, its duplicate check prepared), from a thread
    rows: asyncio.Future  # (its Rows without duplicates, how many were taken out), once checked
    stored: asyncio.Future  # done once it is stored (or dropped, or left to its plan)
    dropped: bool = False  # its partition was revoked before its plan was committed
    planned: bool = False  # its plan was committed with the end of the batch before it (see _store)


class Pipeline:
    def __init__(self, settings: Settings, client: Client, kafka: KafkaSide, inserter: Inserter, tiers: TierCache,
                 duplicate_check: DuplicateCheck, stop: asyncio.Event, pause: Pause):
        """``stop``: set when the sink is asked to stop; ``pause``: between retries,
        raising GaveUp once it is set."""
        self.settings = settings
        self.client = client
        self.kafka = kafka
        self.inserter = inserter
        self.tiers = tiers
        self.buffers = Buffers.from_settings(settings)
        self.bounds = time_bounds_from_settings(settings)  # the processor's: both skip the same events
        self._duplicates = duplicate_check
        self._stop = stop
        self._pause = pause
        self._pending: deque[Pending] = deque()  # in order; the first one is being stored
        self._taken = asyncio.Event()  # a batch joined _pending

    # --- rebalances ----------------------------------------------------------------

    def listener(self) -> ConsumerRebalanceListener:
        pipeline = self

        class Rebalance(ConsumerRebalanceListener):
            async def on_partitions_revoked(self, revoked):
                pipeline.revoked(set(revoked))

            async def on_partitions_assigned(self, assigned):
                await pipeline.assigned(set(assigned))

        return Rebalance()

    async def assigned(self, assigned: set[TopicPartition]) -> None:
        try:
            plans = await self.kafka.plans(assigned)
        except GaveUp:  # stopping: no batch is taken any more
            return
        for tp, plan in plans.items():
            if self.buffers.replay(tp, plan):  # fetched from elsewhere: read the planned range again
                self.kafka.consumer.seek(tp, plan.start)
        # Only now may batches be taken from these partitions: records can arrive before
        # this listener has run, and a batch taken then would ignore the plan.
        self.buffers.plans_read(assigned)

    def revoked(self, revoked: set[TopicPartition]) -> None:
        self.buffers.forget(revoked)
        # Batches whose plan is not committed yet are dropped (the next owner reads them
        # again); one whose plan is committed is stored, or left to that plan if its
        # commit is refused.
        for pending in self._pending:
            if pending.tp in revoked:
                pending.dropped = True
        BUFFERED.set(self._held())

    # --- the loop --------------------------------------------------------------------

    async def run(self) -> None:
        """Fetch, and feed the pipeline, until the sink stops. Raises what storing raised
        (GaveUp when asked to stop while ClickHouse or Redis was failing)."""
        size = self.settings.sink_batch_size
        consumer = self.kafka.consumer
        storer = asyncio.ensure_future(self._store_all())
        try:
            while not self._stop.is_set() and not storer.done():
                now = time.monotonic()
                if len(self._pending) < DEPTH and all(p.decoded.done() for p in self._pending):
                    taken = self.buffers.next_batch(now)
                    if taken is not None:
                        self._start(*taken)
                        continue
                partitions = len(consumer.assignment()) + 1
                room = size * partitions - self.buffers.count()
                if self.buffers.size() >= self.settings.sink_batch_bytes * partitions:
                    room = 0
                if room <= 0 and not self._pending:  # full, and nothing could be taken:
                    if self.buffers.replay_waiting():
                        room = size  # a replayed plan longer than today's bound waits for its records
                    else:  # plans still being read after an assignment: fetching on would overfill
                        await asyncio.sleep(0.05)
                        continue
                if room <= 0:  # full: wait until a batch is stored, or decoded (the next can be taken)
                    await asyncio.wait({storer, self._pending[0].stored,
                                        *(p.decoded for p in self._pending if not p.decoded.done())},
                                       return_when=asyncio.FIRST_COMPLETED)
                    continue
                deadline = self.buffers.next_deadline()
                # At least a few ms: getmany(timeout_ms=0) returns without yielding to the event
                # loop, so a replay waiting for its records would spin and starve the fetcher.
                wait_s = 0.5 if deadline is None else max(deadline - now, 0.01)
                if self._pending:
                    wait_s = min(wait_s, 0.05)  # the pipeline moves: come back soon to feed it
                got = await consumer.getmany(timeout_ms=int(wait_s * 1000), max_records=room)
                if consumer.assignment():
                    READY.set(1)
                arrived = time.monotonic()
                for tp, recs in got.items():
                    self.buffers.add(tp, recs, arrived)
                BUFFERED.set(self._held())
        finally:
            # Stopping: the batch being stored ends (or is left to its plan); no other starts.
            self._stop.set()
            self._taken.set()
            await asyncio.wait({storer})
            for pending in self._pending:  # batches not stored: read again by the next start
                for future in (pending.decoded, pending.rows):
                    if future.done() and not future.cancelled():
                        future.exception()  # retrieved: GaveUp while Redis was down, if anything
                    else:
                        future.cancel()
        storer.result()  # what storing raised, if anything (GaveUp included)

    def _held(self) -> int:
        """Records fetched and not stored yet: buffered, or in a batch on its way."""
        return self.buffers.count() + sum(len(p.batch.records) for p in self._pending)

    def _start(self, tp: TopicPartition, batch: Batch) -> None:
        """A batch into the pipeline: decoding starts now, its check once decoded."""
        decoded = asyncio.ensure_future(asyncio.to_thread(self._decode, batch))
        checked = asyncio.ensure_future(self._checked(decoded, self._pending[-1].rows if self._pending else None))
        self._pending.append(Pending(tp, batch, decoded, checked, asyncio.get_running_loop().create_future()))
        self._taken.set()

    # --- decoded, checked, stored ----------------------------------------------------

    def _decode(self, batch: Batch) -> tuple[Rows, Prepared]:
        """The batch's rows and their duplicate check, ready to send (in a thread)."""
        started, cpu = time.perf_counter(), time.thread_time()
        rows = to_rows(batch.records, self.bounds)
        prepared = self._duplicates.prepare(duplicates.groups(rows, batch.range.partition))
        STEP_SECONDS.labels("decode").inc(time.perf_counter() - started)
        STEP_SECONDS.labels("decode_cpu").inc(time.thread_time() - cpu)
        return rows, prepared

    async def _checked(self, decoded: asyncio.Future, previous: asyncio.Future | None) -> tuple[Rows, int]:
        """(the batch's rows without the events already stored from another record, how
        many those were). Checked once the batch taken before it is (whatever its outcome):
        in the order the batches are taken, so each partition's events in offset order.
        While Redis is unreachable the batch waits: nothing is stored unchecked; asked to
        stop meanwhile, raises GaveUp (the batch is read again by the next start)."""
        rows, check = await decoded
        if previous is not None:
            await asyncio.wait({previous})
        if not rows:
            return rows, 0
        # The orgs' tiers are read meanwhile, on their own connection: read when storing the
        # batch, they waited behind this check's script calls in Redis, on the store's path.
        tiers = asyncio.ensure_future(self.tiers.tiers(rows.org_ids))

        async def attempt() -> list[bool]:
            try:
                return await self._duplicates.run(check)
            except (RedisError, OSError):
                DEDUP_FAILURES.inc()
                raise

        started = time.perf_counter()
        try:
            answers = await retry(attempt, "redis: check duplicates", on=(RedisError, OSError), pause=self._pause,
                                  logger=log)
        except BaseException:
            tiers.cancel()
            raise
        STEP_SECONDS.labels("duplicate_check").inc(time.perf_counter() - started)
        rows.set_tiers(await tiers)  # never raises: an unreachable Redis gives the last known tiers
        if not any(answers):
            return rows, 0
        return await asyncio.to_thread(duplicates.without, rows, answers)

    async def _store_all(self) -> None:
        """Store the pending batches in order, each as soon as the one before it is
        stored, until the sink stops."""
        # A batch whose plan is committed is stored even when stopping, as it would have
        # been had the sink stopped a moment earlier: a clean stop leaves no plan behind.
        while not self._stop.is_set() or (self._pending and self._pending[0].planned):
            if not self._pending:
                self._taken.clear()
                await self._taken.wait()
                continue
            pending = self._pending[0]
            await self._store(pending)
            self._pending.popleft()
            pending.stored.set_result(None)

    async def _store(self, pending: Pending) -> None:
        """Plan, store and commit one batch. The plan is committed before the insert: from
        then on a crash leaves it for the partition's next owner. (Decoding and the duplicate
        check, done or under way, only read the records: the places the check keeps in Redis
        give whoever reads these records next the same answers.)"""
        tp, batch = pending.tp, pending.batch
        step = _Steps()
        rows, dropped_duplicates = await pending.rows
        step.done("waiting")
        if pending.dropped:
            return
        if batch.replay:
            REPLAYS.inc()
        elif not pending.planned and not await self.kafka.commit(
                {tp: OffsetAndMetadata(batch.range.start, batch.range.plan_metadata())}):
            return
        step.done("plan_commit")
        for why, n in rows.skipped.items():
            EVENTS.labels(f"{why}_skipped").inc(n)
        EVENTS.labels("duplicate").inc(dropped_duplicates)
        if rows:
            stored = await self.inserter.store(rows, batch.range)
            step.done("insert")
            if batch.replay or stored.retried:
                await self._complete(Rows.join(stored.parts), batch.range)
                step.done("repair")
        # The batch done and the next one planned, if taken already, in one commit: the state
        # the two commits would leave one after the other (every batch of its partition before
        # it is done). On the same partition, one offset: this end is its start. Its plan
        # committed before its check is done is safe: the check only reads (see above); a
        # crash then has the next owner read the range again.
        offsets = {tp: OffsetAndMetadata(batch.range.end + 1, "")}
        follower = self._follower(pending)
        if follower is not None:
            offsets[follower.tp] = OffsetAndMetadata(follower.batch.range.start, follower.batch.range.plan_metadata())
        done = await self.kafka.commit(offsets)
        if follower is not None and done and not follower.dropped:
            follower.planned = True
        step.done("commit")

    def _follower(self, pending: Pending) -> Pending | None:
        """The batch after ``pending`` in the pipeline, if its plan can be committed with
        ``pending``'s end: not a replay (its plan is committed already), and on another
        partition or continuing ``pending``'s range."""
        if self._stop.is_set() or len(self._pending) < 2 or self._pending[0] is not pending:
            return None
        follower = self._pending[1]
        if follower.batch.replay or follower.dropped:
            return None
        if follower.tp == pending.tp and follower.batch.range.start != pending.batch.range.end + 1:
            return None
        return follower

    async def _complete(self, rows: Rows, batch: Range) -> None:
        """After a retried batch: what a table lacks of it is added (see repair.py)."""
        # ClickHouse unreachable: the check is retried, as inserts are
        outcome = await retry(lambda: asyncio.to_thread(repair.complete, self.client, rows, batch),
                              "checking a retried batch", on=Exception, max_s=INSERT_RETRY_MAX_S, pause=self._pause,
                              logger=log, extra={"start": batch.start})
        for table, found in outcome.findings():
            REPAIRS.labels(table, found).inc()
        if outcome:
            log.warning("a retried batch was missing from some tables (ClickHouse had dropped the retry as a "
                        "duplicate) and was added to them",
                        extra={"partition": batch.partition, "start": batch.start, "end": batch.end,
                               "raw_rows_added": outcome.raw_added, "raw_rows_extra": outcome.raw_extra,
                               "rollup_groups_added": outcome.groups_added,
                               "rollup_groups_undecided": outcome.undecided})


class _Steps:
    """Times the steps of storing a batch one after the other, into STEP_SECONDS."""

    def __init__(self):
        self._at = time.perf_counter()

    def done(self, step: str) -> None:
        now = time.perf_counter()
        STEP_SECONDS.labels(step).inc(now - self._at)
        self._at = now
