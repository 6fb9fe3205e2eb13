"""ClickHouse sink: raw events from Kafka into the ``requests`` table (and, through
materialized views, the rollups), each event stored exactly once.

Its own consumer group, so it reads every event whatever the processors do.
Records are buffered per partition and stored in batches of one partition's offset
range, following the plan protocol of sinks/clickhouse/plans.py: plan committed,
insert with a token derived from the range, range committed. A crash anywhere in
between makes the next owner of the partition insert the same range with the same
token, which ClickHouse drops if it had already stored it. After such a retry the
sink checks each table for the batch and adds what the engine dropped by mistake
(sinks/clickhouse/repair.py).

- Failed inserts are retried with backoff, never skipped; meanwhile the buffers fill
  up to their bound and fetching stops, so memory stays bounded (the batches in flight
  and one bound of buffered records) however slow ClickHouse is.
- Rows ClickHouse refuses as data (see writer.is_rejection) are isolated by halving
  the batch and go to the dead-letter topic with ClickHouse's reason, stage ``sink``.
- Schema-invalid events, and events too far in time from their record's arrival, are
  skipped and counted: the processor is the stage that dead-letters them (by the same
  rules, judged against the record's broker timestamp), so each lands in the
  dead-letter topic once. The processor's forwarded copies are skipped too: the
  original is stored.
- An event already stored from another record (published twice) is taken out of the
  batch before it is planned (sinks/clickhouse/duplicates.py); while Redis is
  unreachable the batch waits: nothing is stored unchecked.
- Each row is stamped with the org's tier from Redis (sinks/clickhouse/tier_cache.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import NamedTuple

import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError
from aiokafka.structs import OffsetAndMetadata
from clickhouse_connect.driver.client import Client
from prometheus_client import Counter, Gauge, Histogram
from redis.exceptions import RedisError

from quotaflow.core.settings import Settings
from quotaflow.schemas import deadletter
from quotaflow.schemas.clickhouse import retention
from quotaflow.schemas.clickhouse.client import connect
from quotaflow.schemas.clickhouse.migrate import migrate
from quotaflow.schemas.dedup import DuplicateCheck, Prepared
from quotaflow.schemas.events import time_bounds_from_settings
from quotaflow.schemas.limits import policy_from_settings
from quotaflow.schemas.redis_keys import stored_key
from quotaflow.schemas.topics import DEAD_LETTER_TOPIC, EVENTS_TOPIC, SINK_CLICKHOUSE_GROUP
from quotaflow.sinks.clickhouse import duplicates, repair
from quotaflow.sinks.clickhouse.plans import Range, parse_plan
from quotaflow.sinks.clickhouse.rows import Rows, to_rows
from quotaflow.sinks.clickhouse.tier_cache import TierCache
from quotaflow.sinks.clickhouse.writer import Writer, is_rejection, partitions_bound

log = logging.getLogger(__name__)

EVENTS = Counter("quotaflow_sink_events_total", "Events consumed by the ClickHouse sink, by outcome", ["outcome"])
ROWS = Counter("quotaflow_sink_rows_inserted_total",
               "Rows sent in successful inserts (a replayed batch ClickHouse drops as a duplicate counts again)")
INSERT_SECONDS = Histogram("quotaflow_sink_insert_seconds", "Duration of one ClickHouse insert",
                           buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
READY = Gauge("quotaflow_sink_ready", "1 once the sink has its partitions assigned")
INSERT_FAILURES = Counter("quotaflow_sink_insert_failures_total", "Failed ClickHouse inserts (retried)")
REPLAYS = Counter("quotaflow_sink_batches_replayed_total",
                  "Batches re-inserted from a plan left by a crash or a rebalance (duplicates are dropped by ClickHouse)")
REPAIRS = Counter("quotaflow_sink_repairs_total",
                  "Tables found, after a retried batch, lacking some of it (added), holding some twice (extra), or "
                  "busy with other writers (undecided: left as they are)", ["table", "outcome"])
DEDUP_FAILURES = Counter("quotaflow_sink_duplicate_check_failures_total",
                         "Failed duplicate checks in Redis (retried: the batch waits, nothing is stored unchecked)")
PIPELINE = 3  # batches in flight: decoded, checked for duplicates, stored
BUFFERED = Gauge("quotaflow_sink_buffered_records", "Records fetched from Kafka and held by the sink (buffered or being stored)")


class Batch(NamedTuple):
    range: Range
    records: list  # the Kafka records of the range, invalid ones included
    replay: bool  # True: the range of a plan found after a restart, already committed as a plan


@dataclass(slots=True)
class _Pending:
    """A batch taken from the buffers, on its way to ClickHouse."""

    tp: TopicPartition
    batch: Batch
    decoded: asyncio.Future  # (its Rows, its duplicate check prepared), from a thread
    rows: asyncio.Future  # (its Rows without duplicates, how many were taken out), once checked
    stored: asyncio.Future  # done once it is stored (or dropped, or left to its plan)
    dropped: bool = False  # its partition was revoked before its plan was committed


class ClickHouseSink:
    def __init__(self, settings: Settings, client: Client | None = None):
        self.settings = settings
        self.client = client
        self._stop = asyncio.Event()
        self._buffers: dict[TopicPartition, list] = {}
        self._bytes: dict[TopicPartition, int] = {}  # record value bytes held in each buffer
        self._first_at: dict[TopicPartition, float] = {}  # when the oldest buffered record arrived
        self._replays: dict[TopicPartition, Range] = {}  # plans found in the committed metadata
        self._consumer: AIOKafkaConsumer | None = None
        self._producer: AIOKafkaProducer | None = None
        self._admin: AIOKafkaAdminClient | None = None
        self._last_rejection = ""
        self._opened = False
        self._pending: deque[_Pending] = deque()  # in order; the first one is being stored
        self._taken = asyncio.Event()  # a batch joined _pending
        self._planned: set[TopicPartition] = set()  # assigned partitions whose plans are loaded
        self._retried = False  # an insert of the batch being stored failed and was sent again
        self._duplicates: DuplicateCheck | None = None  # set by run()
        self.bounds = time_bounds_from_settings(settings)  # the processor's: both skip the same events

    def stop(self) -> None:
        self._stop.set()

    async def open(self) -> None:
        """Connect to ClickHouse, apply the migrations and the retention settings."""
        if self.client is None:
            self.client = await asyncio.to_thread(connect, self.settings.clickhouse_url)
        await asyncio.to_thread(migrate, self.client)
        await asyncio.to_thread(retention.apply, self.client, self.settings)
        self._opened = True

    # --- Kafka side ------------------------------------------------------------------

    async def _load_plans(self, assigned: set[TopicPartition]) -> None:
        """Plans left in the committed metadata of newly assigned partitions: those
        batches may or may not be in ClickHouse and are inserted again, as they were."""
        delay = 0.2
        while True:
            try:
                committed = await self._admin.list_consumer_group_offsets(SINK_CLICKHOUSE_GROUP,
                                                                          partitions=list(assigned))
                ends = await self._consumer.end_offsets(list(assigned))
                break
            except KafkaError as exc:  # e.g. a broker restart; a plan missed here would mean duplicates
                if self._stop.is_set():
                    return
                log.warning("reading committed offsets failed, retrying", extra={"error": str(exc), "retry_in_s": delay})
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
        for tp in assigned:
            meta = committed.get(tp)
            plan = parse_plan(tp.topic, tp.partition, meta.offset, meta.metadata) if meta else None
            if plan is None:
                continue
            if plan.end >= ends[tp]:  # the topic was recreated: the plan names records that are gone
                log.warning("ignoring a plan beyond the end of its partition",
                            extra={"partition": tp.partition, "plan_end": plan.end, "end_offset": ends[tp]})
                continue
            self._replays[tp] = plan
            log.info("found a batch planned before a restart; storing it again",
                     extra={"partition": tp.partition, "start": plan.start, "end": plan.end})
            buf = self._buffers.get(tp)
            if buf and buf[0].offset != plan.start:  # fetched from elsewhere: read the planned range again
                self._buffers[tp], self._bytes[tp] = [], 0
                self._consumer.seek(tp, plan.start)
        # Only now may batches be taken from these partitions: records can arrive before
        # this listener has run, and a batch taken then would ignore the plan.
        self._planned |= assigned

    def _forget(self, revoked: set[TopicPartition]) -> None:
        for tp in revoked:
            self._buffers.pop(tp, None)
            self._bytes.pop(tp, None)
            self._first_at.pop(tp, None)
            self._replays.pop(tp, None)
        self._planned -= revoked
        # Batches whose plan is not committed yet are dropped (the next owner reads them
        # again); one whose plan is committed is stored, or left to that plan if its
        # commit is refused.
        for pending in self._pending:
            if pending.tp in revoked:
                pending.dropped = True
        BUFFERED.set(self._held())

    async def _commit(self, offsets: dict[TopicPartition, OffsetAndMetadata]) -> bool:
        """Commit, riding out a broker restart. False when the partitions were taken
        away by a rebalance: their next owner finds the plan and finishes the batch."""
        delay = 0.2
        while True:
            try:
                await self._consumer.commit({tp: (om.offset, om.metadata) for tp, om in offsets.items()})
                return True
            except (CommitFailedError, IllegalStateError) as exc:  # the latter: no longer assigned here
                log.warning("offset commit refused after a rebalance; the batch is left to the plan",
                            extra={"error": str(exc)})
                return False
            except KafkaError as exc:
                if self._stop.is_set():
                    return False
                log.warning("offset commit failed, retrying", extra={"error": str(exc), "retry_in_s": delay})
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _dead_letter(self, rec, index: int, event, reason: str) -> None:
        """The refused event alone (its record may carry others), with where it came from."""
        await self._producer.send_and_wait(
            DEAD_LETTER_TOPIC, event.encode(), key=rec.key,
            headers=deadletter.headers(reason, deadletter.STAGE_SINK, topic=rec.topic, partition=rec.partition,
                                       offset=rec.offset, index=index, ts_ms=int(time.time() * 1000)))

    # --- ClickHouse side -------------------------------------------------------------

    async def _insert(self, writer: Writer, rows: Rows, token: str) -> bool:
        """Insert until ClickHouse takes the rows (True) or refuses them as data (False).
        Raises _Stopped when asked to stop while failing: the plan finishes the batch."""
        delay = 0.2
        while True:
            started = time.perf_counter()
            try:
                await asyncio.to_thread(writer.insert, rows, token)
            except Exception as exc:  # any driver/server error: refused data, or retry
                if is_rejection(exc):
                    self._last_rejection = str(exc)
                    return False
                INSERT_FAILURES.inc()
                self._retried = True  # it may have landed in part: the batch is checked once stored
                log.warning("clickhouse insert failed, retrying",
                            extra={"error": str(exc)[:500], "rows": len(rows), "retry_in_s": delay})
                if self._stop.is_set():
                    raise _Stopped from None
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
                continue
            INSERT_SECONDS.observe(time.perf_counter() - started)
            ROWS.inc(len(rows))
            EVENTS.labels("stored").inc(len(rows))
            return True

    async def _store(self, writer: Writer, rows: Rows, batch: Range, token: str) -> list[Rows]:
        """Store rows; rows ClickHouse refuses are found by halving and dead-lettered.
        Halving is deterministic, so a replayed batch is split the same way and each
        part carries the same token as before. Returns the parts stored."""
        if await self._insert(writer, rows, token):
            return [rows]
        if len(rows) == 1:
            rec, index, event = rows.source(0)
            log.warning("clickhouse refused an event; dead-lettering it",
                        extra={"partition": rec.partition, "offset": rec.offset, "index": index,
                               "reason": self._last_rejection[:500]})
            await self._dead_letter(rec, index, event, f"clickhouse refused the row: {self._last_rejection}")
            EVENTS.labels("rejected").inc()
            return []
        mid = len(rows) // 2
        stored = []
        for part in (rows.slice(0, mid), rows.slice(mid, len(rows))):
            stored += await self._store(writer, part, batch, batch.sub_token(part.place(0), part.place(len(part) - 1)))
        return stored

    # --- the loop --------------------------------------------------------------------

    def _buffered(self) -> int:
        return sum(len(b) for b in self._buffers.values())

    def _held(self) -> int:
        """Records fetched and not stored yet: buffered, or in a batch on its way."""
        return self._buffered() + sum(len(p.batch.records) for p in self._pending)

    def _ready(self, now: float) -> dict[TopicPartition, tuple[Range, int, bool]]:
        """Per partition with a batch to store now: (range, number of buffered records
        it takes, whether it replays a plan). Only looks; _take takes one."""
        out = {}
        size, max_bytes = self.settings.sink_batch_size, self.settings.sink_batch_bytes
        for tp, buf in self._buffers.items():
            if not buf or tp not in self._planned:
                continue
            plan = self._replays.get(tp)
            if plan is not None:
                if buf[-1].offset >= plan.end:  # else the rest of the planned range is still to come
                    out[tp] = (plan, sum(1 for rec in buf if rec.offset <= plan.end), True)
            elif (len(buf) >= size or self._bytes.get(tp, 0) >= max_bytes
                  or now - self._first_at[tp] >= self.settings.sink_batch_seconds):
                n = _prefix(buf, size, max_bytes)
                out[tp] = (Range(tp.topic, tp.partition, buf[0].offset, buf[n - 1].offset), n, False)
        return out

    def _take(self, tp: TopicPartition, batch_range: Range, n: int, replay: bool, now: float) -> Batch:
        buf = self._buffers[tp]
        batch = Batch(batch_range, buf[:n], replay)
        self._bytes[tp] -= sum(_size(rec) for rec in buf[:n])
        del buf[:n]
        self._first_at[tp] = now
        if replay:
            del self._replays[tp]  # its records are all in this batch
        return batch

    def _decode(self, batch: Batch) -> tuple[Rows, Prepared]:
        """The batch's rows and their duplicate check, ready to send (in a thread)."""
        rows = to_rows(batch.records, self.bounds)
        return rows, self._duplicates.prepare(duplicates.groups(rows, batch.range.partition))

    async def _checked(self, decoded: asyncio.Future, previous: asyncio.Future | None) -> tuple[Rows, int]:
        """(the batch's rows without the events already stored from another record, how
        many those were). Checked once the batch taken before it is (whatever its outcome):
        in the order the batches are taken, so each partition's events in offset order."""
        rows, check = await decoded
        if previous is not None:
            await asyncio.wait({previous})
        if not rows:
            return rows, 0
        answers = await self._until_redis(lambda: self._duplicates.run(check), "check duplicates")
        if not any(answers):
            return rows, 0
        return await asyncio.to_thread(duplicates.without, rows, answers)

    async def _until_redis(self, op, what: str):
        """Retry until Redis answers; raises _Stopped when asked to stop meanwhile (the
        batch is read again by the next start)."""
        delay = 0.2
        while True:
            try:
                return await op()
            except (RedisError, OSError) as exc:
                DEDUP_FAILURES.inc()
                log.warning("redis unavailable, retrying", extra={"op": what, "error": str(exc), "retry_in_s": delay})
                if self._stop.is_set():
                    raise _Stopped from None
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _store_batch(self, writer: Writer, tiers: TierCache, pending: _Pending) -> None:
        """Plan, store and commit one batch. The plan is committed before the insert: from
        then on a crash leaves it for the partition's next owner. (Decoding and the duplicate
        check, done or under way, only read the records: the places the check keeps in Redis
        give whoever reads these records next the same answers.)"""
        tp, batch = pending.tp, pending.batch
        rows, dropped_duplicates = await pending.rows
        if pending.dropped:
            return
        if batch.replay:
            REPLAYS.inc()
        elif not await self._commit({tp: OffsetAndMetadata(batch.range.start, batch.range.plan_metadata())}):
            return
        for why, n in rows.skipped.items():
            EVENTS.labels(f"{why}_skipped").inc(n)
        EVENTS.labels("duplicate").inc(dropped_duplicates)
        if rows:
            rows.set_tiers(await tiers.tiers(rows.org_ids))
            self._retried = False
            stored = await self._store(writer, rows, batch.range, batch.range.token())
            if batch.replay or self._retried:
                await self._complete(Rows.join(stored), batch.range)
        await self._commit({tp: OffsetAndMetadata(batch.range.end + 1, "")})

    async def _complete(self, rows: Rows, batch: Range) -> None:
        """After a retried batch: what a table lacks of it is added (see repair.py)."""
        delay = 0.2
        while True:
            try:
                outcome = await asyncio.to_thread(repair.complete, self.client, rows, batch)
                break
            except Exception as exc:  # ClickHouse unreachable: the check is retried, as inserts are
                log.warning("checking a retried batch failed, retrying",
                            extra={"error": str(exc)[:500], "start": batch.start, "retry_in_s": delay})
                if self._stop.is_set():
                    raise _Stopped from None
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
        for table, found in outcome.findings():
            REPAIRS.labels(table, found).inc()
        if outcome:
            log.warning("a retried batch was missing from some tables (ClickHouse had dropped the retry as a "
                        "duplicate) and was added to them",
                        extra={"partition": batch.partition, "start": batch.start, "end": batch.end,
                               "raw_rows_added": outcome.raw_added, "raw_rows_extra": outcome.raw_extra,
                               "rollup_groups_added": outcome.groups_added,
                               "rollup_groups_undecided": outcome.undecided})

    async def run(self) -> None:
        if not self._opened:
            await self.open()
        writer = Writer(self.client, partitions_bound(self.settings.retention_raw_days))
        tiers = TierCache(self.settings.redis_url, policy_from_settings(self.settings).tier_of)
        redis = aioredis.Redis.from_url(self.settings.redis_url, socket_timeout=10.0, socket_connect_timeout=2.0)
        self._duplicates = DuplicateCheck(redis, stored_key, self.settings.dedup_window_s)
        sink = self

        class Rebalance(ConsumerRebalanceListener):
            async def on_partitions_revoked(self, revoked):
                sink._forget(set(revoked))

            async def on_partitions_assigned(self, assigned):
                await sink._load_plans(set(assigned))

        self._admin = AIOKafkaAdminClient(bootstrap_servers=self.settings.kafka_bootstrap)
        self._producer = AIOKafkaProducer(bootstrap_servers=self.settings.kafka_bootstrap, enable_idempotence=True)
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=self.settings.kafka_bootstrap,
            group_id=SINK_CLICKHOUSE_GROUP,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            isolation_level="read_committed",
            max_partition_fetch_bytes=4 * 1024 * 1024,
            metadata_max_age_ms=5000,  # see processors/app.py: recover quickly from a broker restart
        )
        await self._admin.start()
        await self._producer.start()
        await self._consumer.start()
        self._consumer.subscribe([EVENTS_TOPIC], listener=Rebalance())
        log.info("clickhouse sink started", extra={"clickhouse": self.settings.clickhouse_url.split("@")[-1]})
        try:
            await self._consume(writer, tiers)
        except _Stopped:
            pass
        finally:
            await self._consumer.stop()
            await self._producer.stop()
            await self._admin.close()
            await tiers.close()
            await redis.aclose()
            READY.set(0)
            log.info("clickhouse sink stopped")

    async def _store_all(self, writer: Writer, tiers: TierCache) -> None:
        """Store the pending batches in order, each as soon as the one before it is
        stored, until the sink stops."""
        while not self._stop.is_set():
            if not self._pending:
                self._taken.clear()
                await self._taken.wait()
                continue
            pending = self._pending[0]
            await self._store_batch(writer, tiers, pending)
            self._pending.popleft()
            pending.stored.set_result(None)

    async def _consume(self, writer: Writer, tiers: TierCache) -> None:
        """Fetch into the buffers while batches go through a pipeline of three: a batch is
        decoded (in a thread) while the one before it is checked for duplicates (in Redis)
        and the one before that is stored. The engine releases the GIL, so decoding and
        inserting overlap, and records keep being fetched meanwhile. One decode at a time:
        several would only contend for the GIL."""
        size = self.settings.sink_batch_size
        storer = asyncio.ensure_future(self._store_all(writer, tiers))
        try:
            while not self._stop.is_set() and not storer.done():
                now = time.monotonic()
                if len(self._pending) < PIPELINE and all(p.decoded.done() for p in self._pending):
                    ready = self._ready(now)
                    if ready:
                        tp = min(ready, key=self._first_at.__getitem__)  # the one waiting longest
                        batch = self._take(tp, *ready[tp], now)
                        decoded = asyncio.ensure_future(asyncio.to_thread(self._decode, batch))
                        checked = asyncio.ensure_future(
                            self._checked(decoded, self._pending[-1].rows if self._pending else None))
                        self._pending.append(_Pending(tp, batch, decoded, checked,
                                                      asyncio.get_running_loop().create_future()))
                        self._taken.set()
                        continue
                # Backpressure: the buffers are bounded (records and bytes); the batches in
                # the pipeline are held besides them, so memory stays bounded however
                # slowly ClickHouse takes them.
                partitions = len(self._consumer.assignment()) + 1
                room = size * partitions - self._buffered()
                if sum(self._bytes.values()) >= self.settings.sink_batch_bytes * partitions:
                    room = 0
                if room <= 0 and not self._pending:  # full, and nothing could be taken:
                    if any(tp in self._planned for tp in self._replays):
                        room = size  # a replayed plan longer than today's bound waits for its records
                    else:  # plans still being read after an assignment: fetching on would overfill
                        await asyncio.sleep(0.05)
                        continue
                if room <= 0:  # full: wait until a batch is stored, or decoded (the next can be taken)
                    await asyncio.wait({storer, self._pending[0].stored,
                                        *(p.decoded for p in self._pending if not p.decoded.done())},
                                       return_when=asyncio.FIRST_COMPLETED)
                    continue
                deadlines = [self._first_at[tp] + self.settings.sink_batch_seconds
                             for tp, buf in self._buffers.items() if buf]
                # At least a few ms: getmany(timeout_ms=0) returns without yielding to the event
                # loop, so a replay waiting for its records would spin and starve the fetcher.
                wait_s = min([max(d - now, 0.01) for d in deadlines], default=0.5)
                if self._pending:
                    wait_s = min(wait_s, 0.05)  # the pipeline moves: come back soon to feed it
                got = await self._consumer.getmany(timeout_ms=int(wait_s * 1000), max_records=room)
                if self._consumer.assignment():
                    READY.set(1)
                arrived = time.monotonic()
                for tp, recs in got.items():
                    buf = self._buffers.setdefault(tp, [])
                    if not buf:
                        self._first_at[tp] = arrived
                    buf.extend(recs)
                    self._bytes[tp] = self._bytes.get(tp, 0) + sum(_size(rec) for rec in recs)
                BUFFERED.set(self._held())
        finally:
            # Stopping: the batch being stored ends (or is left to its plan); no other starts.
            self._stop.set()
            self._taken.set()
            await asyncio.wait({storer})
            for pending in self._pending:  # batches not stored: read again by the next start
                for future in (pending.decoded, pending.rows):
                    if future.done() and not future.cancelled():
                        future.exception()  # retrieved: _Stopped while Redis was down, if anything
                    else:
                        future.cancel()
        storer.result()  # what storing raised, if anything (_Stopped included)


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


class _Stopped(Exception):
    """Stop was requested while an insert was failing: leave the batch to its plan."""
