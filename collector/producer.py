"""The producer core every collector publishes through: records to Kafka (aiokafka:
idempotent, acks=all, zstd, batched by linger), a delivery outcome per record, and a
disk spool (collector/spool.py) for when Kafka is unreachable or slow.

``submit`` never waits: it puts the record on a bounded in-memory queue and returns a
future of its outcome (``DELIVERED``, ``SPOOLED``: on disk, to be replayed; ``LOST``).
A pump task sends the queue to Kafka. It switches to spooling, and from then on writes
every record to the spool instead (in order, fsync'd, from a worker thread: no disk I/O
on the event loop), when

- the producer cannot start (Kafka unreachable at start: ``start`` does not fail then),
- a send or a delivery fails or is not acknowledged within ``delivery_timeout_s`` (that
  record is spooled too),
- the records sent and not yet acknowledged reach ``memory_bytes`` and the queue fills
  behind them (Kafka slow).

A replay task sends the spool's records, oldest first, waits until Kafka has acknowledged
them, and only then advances; a segment is deleted once all its records were
acknowledged. Failures are retried with the one retry policy (core/retry.py). Once the
spool is empty the pump sends directly again. A new core over the same directory (after
a restart or a crash) replays what the old one left before anything new.

Guarantee: at-least-once to Kafka, exactly-once downstream by event_id. A record whose
acknowledgement did not come in time is spooled although Kafka may still have taken it,
and a crash between a replayed send and the deletion of its segment replays it again:
Kafka may get a record twice. Every event carries its event_id in both copies, and the
processor and the sink count and store an event id once (schemas/dedup.py) when the
copies arrive within QUOTAFLOW_DEDUP_WINDOW_S (600 s) of each other; a spool replayed
later than that after its first attempt can count an event twice.

What is lost is counted (``quotaflow_collector_events_total{outcome="lost"}``) and logged:
without a spool, a failed delivery or a full queue; with one, a full queue (the disk not
keeping up either), a failed disk write, and the oldest segment dropped at the byte bound.
Order: records go to Kafka in the order submitted, except that a record whose delivery
failed may land after records submitted after it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from pathlib import Path
from typing import Iterable

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from aiokafka.partitioner import DefaultPartitioner
from prometheus_client import Counter

from quotaflow.collector.spool import Record, Spool
from quotaflow.core.retry import GaveUp, pause_until, retry
from quotaflow.schemas.event_partitions import key_hash

log = logging.getLogger(__name__)

EVENTS = Counter("quotaflow_collector_events_total", "Events handed to Kafka by the collectors, by outcome: "
                 "delivered (acknowledged), spooled (to the disk spool), lost, dead_lettered (invalid input)",
                 ["outcome"])

DELIVERED, SPOOLED, LOST = "delivered", "spooled", "lost"
_DELIVERED_COUNT = EVENTS.labels(DELIVERED)  # per record: looked up once
# Why ``pressure`` says a record would not be kept now (a caller that can refuse, the HTTP
# ingest, answers 429 or 503 instead of submitting it to be lost).
BUFFER_FULL, BROKER_UNREACHABLE = "buffer_full", "broker_unreachable"
_SPOOL_MARGIN = 4096  # frame and segment headers of what is written beside a record
REPLAY_BYTES = 4 * 1024 * 1024  # read from the spool and sent at once
SPOOL_WRITE_BYTES = 8 * 1024 * 1024  # written (and fsync'd) at once
# aiokafka's send only appends to its batch of the partition; it waits when that batch is
# full and not draining (Kafka slow or away). Waiting longer would hold up the pump while
# the queue fills behind it.
SEND_TIMEOUT_S = 1.0
_FAILURES = (KafkaError, OSError, asyncio.TimeoutError)

__all__ = ["ProducerCore", "Record", "DELIVERED", "SPOOLED", "LOST", "EVENTS", "BUFFER_FULL", "BROKER_UNREACHABLE"]


class _Unacknowledged(Exception):
    """A replayed batch was not acknowledged in time (or its delivery failed)."""


class ProducerCore:
    def __init__(self, bootstrap_servers: str, *, linger_ms: int = 5, max_batch_bytes: int = 1024 * 1024,
                 compression: str = "zstd", spool_dir: Path | str | None = None,
                 spool_max_bytes: int = 256 * 1024 * 1024, spool_segment_bytes: int = 16 * 1024 * 1024,
                 spool_topics: Iterable[str] | None = None, memory_bytes: int = 32 * 1024 * 1024,
                 delivery_timeout_s: float = 10.0, stop_timeout_s: float = 10.0):
        if memory_bytes < 1 or delivery_timeout_s <= 0 or stop_timeout_s < 0:
            raise ValueError("memory_bytes and delivery_timeout_s must be positive, stop_timeout_s not negative")
        self._producer_args = dict(
            bootstrap_servers=bootstrap_servers,
            enable_idempotence=True,  # implies acks=all; retries never duplicate
            compression_type=compression,
            linger_ms=linger_ms,
            max_batch_size=max_batch_bytes,
            max_request_size=max_batch_bytes * 2,
            partitioner=_partition,
        )
        self.spool = None if spool_dir is None else Spool(
            spool_dir, max_bytes=spool_max_bytes, segment_bytes=spool_segment_bytes,
            topics=None if spool_topics is None else set(spool_topics))
        self.memory_bytes = memory_bytes
        self.delivery_timeout_s = delivery_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self._send_timeout_s = min(SEND_TIMEOUT_S, delivery_timeout_s)
        self.delivered = 0  # events acknowledged by Kafka (directly or replayed from the spool)
        self.spooled = 0  # events written to the spool
        self.lost = 0  # events neither delivered nor kept
        self._producer: AIOKafkaProducer | None = None
        self._queue: collections.deque[tuple[Record, asyncio.Future | None]] = collections.deque()
        self._queued_bytes = 0
        self._respool: list[tuple[Record, asyncio.Future | None]] = []  # sends that failed, to be spooled
        # aiokafka's delivery future -> the record, its outcome, its deadline (loop time, with a spool)
        self._inflight: dict[asyncio.Future, tuple[Record, asyncio.Future | None, float | None]] = {}
        self._deadline_timer: asyncio.TimerHandle | None = None  # at the oldest in-flight record's deadline
        self._inflight_bytes = 0
        self._spooling = False
        self._sending = False  # the pump is handing a record to aiokafka
        self._writing = False  # a spool write is under way
        self._replaying = False  # the replay loop is at work
        self._spool_lock = asyncio.Lock()  # spool writes vs. the replay's "spool empty, send directly again"
        self._wake = asyncio.Event()
        self._replay_wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._waiters: list[asyncio.Future] = []
        self._tasks: list[asyncio.Task] = []

    # --- lifecycle ---

    async def start(self) -> None:
        """Connect to Kafka. Without a spool a broker that cannot be reached fails the
        start (as aiokafka does); with one the core starts anyway, spools, and connects in
        the background."""
        if self.spool is not None:
            await asyncio.to_thread(self.spool.open)
            self._spooling = not self.spool.empty()  # what an earlier run left goes first
            try:
                await self._connect()
            except _FAILURES as exc:
                log.warning("kafka unreachable at start; spooling to disk until it is back",
                            extra={"error": str(exc)[:500]})
                self._spooling = True
            self._tasks.append(asyncio.create_task(self._replay_loop(), name="spool-replay"))
            self._replay_wake.set()
        else:
            await self._connect()
        self._tasks.append(asyncio.create_task(self._pump(), name="producer-pump"))

    async def _connect(self) -> None:
        producer = AIOKafkaProducer(**self._producer_args)
        try:
            await producer.start()
        except BaseException:
            with contextlib.suppress(Exception):
                await producer.stop()
            raise
        self._producer = producer

    async def stop(self) -> None:
        """Wait up to ``stop_timeout_s`` (with a spool; without one as long as deliveries
        take) for everything to be acknowledged; with a spool, what is not yet
        acknowledged then is written to it, to be replayed by the next run."""
        try:
            if self.spool is None:
                await self.flush()
            else:
                await asyncio.wait_for(self.flush(), self.stop_timeout_s)
        except asyncio.TimeoutError:
            pass
        self._stopping.set()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        left = self._respool + list(self._queue) + [(record, outcome) for record, outcome, _ in self._inflight.values()]
        self._respool, self._queued_bytes = [], 0
        self._queue.clear()
        if self._deadline_timer is not None:
            self._deadline_timer.cancel()
            self._deadline_timer = None
        self._inflight.clear()  # what aiokafka still says of them is read and ignored (_acknowledged)
        self._inflight_bytes = 0
        if self.spool is not None:
            if left:
                await self._write_spool(left)
            await asyncio.to_thread(self.spool.close)
        else:
            for record, outcome in left:
                self._lose(record, outcome, "stopped")
        await self._stop_producer()

    async def _stop_producer(self, timeout_s: float | None = None) -> None:
        producer, self._producer = self._producer, None
        if producer is None:
            return
        if timeout_s is None and self.spool is not None:
            timeout_s = self.stop_timeout_s
        stopping = asyncio.create_task(producer.stop())
        done, _ = await asyncio.wait([stopping], timeout=timeout_s)
        if not done:
            # aiokafka's stop waits for its batches to be delivered, for ever if the broker is
            # gone: with a spool what they hold is on disk now, so stop its sender task.
            sender = getattr(getattr(producer, "_sender", None), "sender_task", None)
            if sender is not None:
                sender.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(stopping, 5)
        elif stopping.exception() is not None:
            log.warning("kafka producer stop failed", extra={"error": str(stopping.exception())[:500]})

    # --- submitting ---

    def submit(self, record: Record, want_outcome: bool = False) -> asyncio.Future | None:
        """Queue a record for Kafka without waiting. With ``want_outcome``, a future of
        its outcome: DELIVERED, SPOOLED or LOST."""
        outcome = asyncio.get_running_loop().create_future() if want_outcome else None
        size = record.size
        if size > self._producer_args["max_request_size"]:
            self._lose(record, outcome, f"record of {size} bytes is over the producer's request size")
            return outcome
        if self._queued_bytes + size > self.memory_bytes and self._queue:
            self._lose(record, outcome, "queue full")
            return outcome
        self._queue.append((record, outcome))
        self._queued_bytes += size
        self._wake.set()
        return outcome

    def pressure(self, size: int) -> str | None:
        """Whether records of ``size`` bytes submitted now would be kept (None), or why
        not: BUFFER_FULL (the memory bound is taken: Kafka, or the disk, is behind), or
        BROKER_UNREACHABLE (Kafka is away and the spool has no room for them without
        dropping its oldest segment, or there is no spool)."""
        if self._queue and self._queued_bytes + size > self.memory_bytes:
            return BUFFER_FULL
        if self.spool is None:
            return BROKER_UNREACHABLE if self._producer is None else None
        if self._spooling or self._producer is None:
            held = self.spool.total_bytes + self._queued_bytes + sum(r.size for r, _ in self._respool)
            if held + size + _SPOOL_MARGIN > self.spool.max_bytes:
                return BROKER_UNREACHABLE
        return None

    async def flush(self) -> None:
        """Wait until every record submitted so far is acknowledged by Kafka (replayed from
        the spool if it went there) or lost."""
        while not self._idle():
            fut = asyncio.get_running_loop().create_future()
            self._waiters.append(fut)
            self._wake.set()
            await fut

    def _idle(self) -> bool:
        return not (self._queue or self._respool or self._inflight or self._sending or self._writing or self._replaying
                    or (self.spool is not None and not self.spool.empty()))

    def _changed(self) -> None:
        waiters, self._waiters = self._waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    # --- the pump: queue -> Kafka, or -> spool ---

    async def _pump(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                await self._pump_once()
            except asyncio.CancelledError:
                raise
            except Exception:  # never let the pump die: what it holds would wait for ever
                log.exception("producer pump failed; going on")
                self._wake.set()
                await asyncio.sleep(0.1)
            self._changed()

    async def _pump_once(self) -> None:
        while self._queue or (self._respool and self.spool is not None):
            if self.spool is not None and (self._spooling or self._respool or self._producer is None):
                self._spooling = True
                await self._spool_some()
            elif self._producer is not None and self._inflight_bytes < self.memory_bytes:
                record, outcome = self._queue.popleft()
                self._queued_bytes -= record.size
                self._sending = True  # in neither the queue nor in flight yet: flush waits for it
                try:
                    await self._send(record, outcome)
                finally:
                    self._sending = False
            elif self.spool is not None and self._queued_bytes >= self.memory_bytes // 2:
                log.warning("kafka slow: spooling to disk", extra={"inflight_bytes": self._inflight_bytes})
                self._spooling = True
            else:
                return  # a delivery or the connection wakes the pump

    async def _send(self, record: Record, outcome: asyncio.Future | None) -> None:
        # Per record no task and no wait_for (each a task of its own in Python 3.11: together
        # they cost the emitter more CPU per record than aiokafka's send), but a timeout scope
        # around the send, and a callback for the delivery (one timer for all deliveries).
        try:
            send = self._producer.send(record.topic, value=record.value, key=record.key,
                                       headers=list(record.headers) or None)
            if self.spool is None:
                fut = await send
            else:
                async with asyncio.timeout(self._send_timeout_s):
                    fut = await send
        except asyncio.CancelledError:
            self._respool.append((record, outcome))  # not handed to aiokafka: stop() spools it
            raise
        except _FAILURES as exc:
            self._undelivered(record, outcome, exc)
            return
        deadline = None
        if self.spool is not None:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self.delivery_timeout_s
            if self._deadline_timer is None:
                self._deadline_timer = loop.call_at(deadline, self._not_acknowledged)
        self._inflight[fut] = (record, outcome, deadline)
        self._inflight_bytes += record.size
        fut.add_done_callback(self._acknowledged)

    def _acknowledged(self, fut: asyncio.Future) -> None:
        """aiokafka's delivery future of a record in flight is done: delivered, or failed."""
        failure = fut.exception() if not fut.cancelled() else asyncio.CancelledError()  # read: never "unretrieved"
        entry = self._settle(fut)
        if entry is None:  # given up on already (not acknowledged in time, or the core stopped)
            return
        record, outcome, _ = entry
        if failure is None:
            self._delivered(record, outcome)
        else:
            self._undelivered(record, outcome, failure)
        self._wake.set()
        self._changed()

    def _not_acknowledged(self) -> None:
        """With a spool: records not acknowledged within delivery_timeout_s are spooled (what
        aiokafka says of them later is read and ignored). One timer, at the oldest record's
        deadline: records go in flight in order, each with the same timeout, so the
        in-flight table (in insertion order) is in the order of their deadlines."""
        self._deadline_timer = None
        loop = asyncio.get_running_loop()
        now, late, upcoming = loop.time(), [], None
        for fut, (_, _, deadline) in self._inflight.items():
            if deadline > now:
                upcoming = deadline
                break
            late.append(fut)
        for fut in late:
            record, outcome, _ = self._settle(fut)
            self._undelivered(record, outcome,
                              asyncio.TimeoutError(f"not acknowledged in {self.delivery_timeout_s} s"))
        if upcoming is not None:
            self._deadline_timer = loop.call_at(upcoming, self._not_acknowledged)
        if late:
            self._wake.set()
            self._changed()

    def _settle(self, fut: asyncio.Future) -> tuple[Record, asyncio.Future | None, float | None] | None:
        entry = self._inflight.pop(fut, None)
        if entry is not None:
            self._inflight_bytes -= entry[0].size
        return entry

    def _delivered(self, record: Record, outcome: asyncio.Future | None) -> None:
        self.delivered += record.events
        _DELIVERED_COUNT.inc(record.events)
        if outcome is not None:
            _resolve(outcome, DELIVERED)

    def _undelivered(self, record: Record, outcome: asyncio.Future | None, exc: BaseException) -> None:
        if self.spool is None:
            self._lose(record, outcome, repr(exc))
            return
        if not self._spooling:
            log.warning("kafka delivery failed or timed out; spooling to disk until it is back",
                        extra={"error": str(exc)[:500] or repr(exc)})
        self._spooling = True
        self._respool.append((record, outcome))
        self._wake.set()

    def _lose(self, record: Record, outcome: asyncio.Future | None, reason: str) -> None:
        self.lost += record.events
        EVENTS.labels(LOST).inc(record.events)
        log.error("event delivery failed", extra={"events": record.events, "topic": record.topic,
                                                  "error": reason[:500]})
        _resolve(outcome, LOST)

    # --- the spool ---

    async def _spool_some(self) -> None:
        batch, size = self._respool, 0
        self._respool = []
        size = sum(r.size for r, _ in batch)
        while self._queue and size < SPOOL_WRITE_BYTES:
            record, outcome = self._queue.popleft()
            self._queued_bytes -= record.size
            size += record.size
            batch.append((record, outcome))
        await self._write_spool(batch)

    async def _write_spool(self, batch: list[tuple[Record, asyncio.Future | None]]) -> None:
        """Append the batch to the spool. A write under way runs to its end even if the
        caller is cancelled (stop): its records are then accounted for all the same."""
        self._writing = True
        try:
            async with self._spool_lock:
                dropped = self.spool.dropped_events
                write = asyncio.ensure_future(asyncio.to_thread(self.spool.append, [r for r, _ in batch]))
                try:
                    await asyncio.shield(write)
                except Exception:
                    pass  # accounted for below
                finally:
                    if not write.done():  # cancelled (stop) mid-write: let it finish
                        with contextlib.suppress(asyncio.CancelledError):
                            await asyncio.wait([write])
                    self._spooled(batch, write, self.spool.dropped_events - dropped)
        finally:
            self._writing = False
        self._replay_wake.set()

    def _spooled(self, batch: list[tuple[Record, asyncio.Future | None]], write: asyncio.Future,
                 dropped: int) -> None:
        if dropped:  # the oldest segments, dropped at the byte bound (counted and logged by the spool)
            self.lost += dropped
            EVENTS.labels(LOST).inc(dropped)
        if write.cancelled() or write.exception() is not None:
            error = "cancelled" if write.cancelled() else str(write.exception())
            for record, outcome in batch:
                self._lose(record, outcome, f"spool write failed: {error}")
            return
        for record, outcome in batch:
            self.spooled += record.events
            EVENTS.labels(SPOOLED).inc(record.events)
            _resolve(outcome, SPOOLED)

    async def _replay_loop(self) -> None:
        pause = pause_until(self._stopping)
        while True:
            await self._replay_wake.wait()
            self._replay_wake.clear()
            try:
                while not self.spool.empty():
                    self._replaying = True  # flush waits for the loop's own accounting, not the spool's
                    await retry(self._replay_once, "spool replay", on=_FAILURES + (_Unacknowledged,), pause=pause,
                                max_s=2.0, logger=log)
                    self._changed()
                self._replaying = False
                async with self._spool_lock:
                    if self.spool.empty() and self._producer is not None and self._spooling:
                        self._spooling = False
                        log.info("spool replayed; sending to kafka directly again")
                self._wake.set()
                self._changed()
            except GaveUp:
                return
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("spool replay failed; going on")
                self._replay_wake.set()
                await asyncio.sleep(0.5)

    async def _replay_once(self) -> None:
        if self._producer is None:
            await self._connect()
            log.info("kafka reachable; replaying the spool")
        batch = await asyncio.to_thread(self.spool.read, REPLAY_BYTES)
        if batch is None:
            return
        futures = []
        for record in batch.records:
            send = self._producer.send(record.topic, value=record.value, key=record.key,
                                       headers=list(record.headers) or None)
            try:
                fut = await asyncio.wait_for(send, self._send_timeout_s)
            except _FAILURES:
                await self._stop_producer(timeout_s=1.0)
                raise
            fut.add_done_callback(_retrieved)
            futures.append(fut)
        if futures:
            done, pending = await asyncio.wait(futures, timeout=self.delivery_timeout_s)
            failed = [f for f in done if f.exception() is not None]
            if pending or failed:
                # A producer whose batches timed out or failed may be stuck for good: aiokafka's
                # idempotent producer answers OutOfOrderSequenceNumber to everything after a
                # batch it gave up on (a broker restart). The next attempt starts a new one
                # (a new producer id); what the old one held is in the spool still.
                await self._stop_producer(timeout_s=1.0)
                raise _Unacknowledged(f"{len(pending)} records not acknowledged in {self.delivery_timeout_s} s, "
                                      f"{len(failed)} failed" + (f": {failed[0].exception()!r}" if failed else ""))
        await asyncio.to_thread(self.spool.ack, batch)
        self.delivered += batch.events
        EVENTS.labels(DELIVERED).inc(batch.events)


def _partition(key: bytes | None, all_partitions: list[int], available: list[int]) -> int:
    """aiokafka's default partitioner, each key's hash cached (schemas key_hash, which
    partition_of uses too): a collector sends the same few org keys again and again."""
    if key is None:
        return DefaultPartitioner()(key, all_partitions, available)
    return all_partitions[key_hash(key) % len(all_partitions)]


def _resolve(outcome: asyncio.Future | None, result: str) -> None:
    if outcome is not None and not outcome.done():
        outcome.set_result(result)


def _retrieved(fut: asyncio.Future) -> None:
    """A delivery whose failure was handled elsewhere (or given up waiting for): read its
    exception so that asyncio does not report it as never retrieved."""
    if not fut.cancelled():
        fut.exception()
