"""The Faust app: counts requests per API key and per org in every window of the
policy, writes counts and decisions to Redis, releases the gateways' reservations
of the events it counts, and dead-letters invalid events.

Guarantee: at-least-once delivery, idempotent effect. A batch is acknowledged
(its offsets become committable) only once its counts are in Redis and its
changelog records, dead letters and forwarded records are on the broker (dead
letters and forwarded records first: the changelog then says the batch is applied).
The table also holds each partition's next offset: records Faust delivers twice
or skips are caught by OffsetGuard; records redelivered after a crash are
recognised by their offset and not counted twice (window_counts keeps, per scope,
the last offset applied). An event published twice (same event_id, two records)
is counted once if the copies arrive within the dedup window. Events with status
429 (refused by a limiter) are never counted.

Counts are kept per (org, key) and per org, each on its org's partition
(schemas.events.partition_of): a record a publisher put on another partition
(another partitioner, another key) is forwarded there and counted from there, so
every count lives in exactly one partition, whoever publishes.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import warnings
from collections import Counter
from typing import Any, NamedTuple, Sequence

import faust
import orjson
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError
from faust.types import TP
from prometheus_client import Counter as PromCounter
from prometheus_client import Gauge, Histogram

from quotaflow.core.settings import Settings
from quotaflow.processors import stopping
from quotaflow.processors.backend import RedisBackend, ScopeWrite
from quotaflow.processors.decisions import decide, decide_org, org_windows
from quotaflow.processors.offset_guard import APPLY, REFETCH, OffsetGuard, next_offset_key
from quotaflow.processors.output import Output, Sent
from quotaflow.processors.window_counts import REDELIVERED, apply_events
from quotaflow.schemas import deadletter
from quotaflow.schemas.dedup import position
from quotaflow.schemas.events import (
    FIELD_NAMES,
    FORWARDED_HEADER,
    SchemaError,
    TimeBounds,
    decode_columns,
    partition_key,
    partition_of,
    time_bounds_from_settings,
)
from quotaflow.schemas.limits import policy_from_settings
from quotaflow.schemas.topics import DEAD_LETTER_TOPIC, EVENTS_TOPIC, PROCESSOR_APP_ID

log = logging.getLogger(__name__)

EVENTS = PromCounter("quotaflow_processor_events_total", "Events consumed by the processor, by outcome", ["outcome"])
DECISIONS = PromCounter("quotaflow_processor_decisions_written_total", "Decisions written to Redis")
BATCH_SECONDS = Histogram("quotaflow_processor_batch_seconds", "Time to process one batch",
                          buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
READY = Gauge("quotaflow_processor_ready", "1 once partitions are assigned and tables recovered")
BACKLOG = Gauge("quotaflow_processor_backlog_records",
                "Records of the assigned partitions not applied yet, skipped ones included (NaN until known)")
BACKLOG.set(float("nan"))
TABLE_NAME = "window-counts"
REJECTED_STATUS = 429
LOG_APPEND_TIME = 1  # a record's timestamp type: stamped by the broker on arrival
SWEEP_EVERY_S = 60.0
DUPLICATE = "duplicate"  # the same event_id already counted from another record


KEY_SCOPE = "k/"
FORWARDED = "forwarded"  # events of a record on another partition than their org's


def key_scope(org_id: str, api_key_id: str) -> str:
    """Table key of a key's counts: keys of different orgs may share an id. Ids cannot
    hold '/' (schemas/ids.py), so the two parts never run into each other."""
    return f"{KEY_SCOPE}{org_id}/{api_key_id}"


def org_scope(org_id: str) -> str:
    return "o/" + org_id


class RequestCounter:
    """Handles one batch of events: the processor's work, apart from Faust's plumbing."""

    def __init__(self, table: faust.Table, output: Output, backend: RedisBackend, guard: OffsetGuard,
                 bounds: TimeBounds, partitions: int):
        self.table = table
        self.output = output
        self.backend = backend
        self.policy = backend.policy
        self.guard = guard
        self.bounds = bounds
        self.partitions = partitions  # of the events topic: where each org is counted
        self._warned_create_time = False
        self._next_sweep = time.monotonic() + SWEEP_EVERY_S

    async def handle(self, events: Sequence[faust.types.EventT]) -> None:
        started = time.perf_counter()
        touched: dict[tuple[str, str], int] = {}  # (org_id, api_key_id) -> partition
        released: dict[tuple[str, str], list[str]] = {}  # reservations to release, per key
        changed: dict[str, int] = {}  # table key -> partition
        sent: list[Sent] = []  # dead letters and forwarded records, on their way to the broker
        fresh: list[_Record] = []  # records whose events were not applied before
        checks = _DuplicateChecks(self.backend)
        outcomes: Counter[str] = Counter()
        try:
            for event in events:
                msg = event.message
                verdict = self.guard.quick(msg.partition, msg.offset) or await self.guard.check(msg.partition,
                                                                                                 msg.offset)
                if verdict == REFETCH:
                    outcomes["refetch"] += 1
                    continue
                changed[next_offset_key(msg.partition)] = msg.partition
                record = await self._read(msg, verdict, outcomes, sent)
                if record is None:
                    continue
                for key, rows in record.keys.items():
                    ident = (record.org_id, key)
                    touched[ident] = msg.partition
                    released.setdefault(ident, []).extend([record.event_ids[j] for j in rows])
                if verdict == REDELIVERED:
                    outcomes[REDELIVERED] += len(record.rows)
                else:
                    fresh.append(record)
                    checks.add(record)
            duplicate = await checks.results()
        finally:
            checks.cancel()
        runs: dict[str, tuple[int, list[int], list[int], list[int]]] = {}  # scope -> (partition, times, positions, clocks)
        done = 0
        for record in fresh:
            dups = duplicate[done:done + len(record.rows)]
            done += len(record.rows)
            if any(dups):
                outcomes[DUPLICATE] += sum(dups)
                record = record.without([j for j, dup in zip(record.rows, dups, strict=True) if dup])
                if not record.rows:
                    continue
            scopes = [(org_scope(record.org_id), record.rows)]
            scopes += [(key_scope(record.org_id, key), rows) for key, rows in record.keys.items()]
            for scope, rows in scopes:
                run = runs.get(scope)
                if run is not None and run[0] != record.partition:  # a scope that moved partition: in order
                    self._apply(scope, run, outcomes, changed)
                    run = None
                if run is None:
                    run = runs[scope] = (record.partition, [], [], [])
                run[1].extend([record.ts_ms[j] for j in rows])
                run[2].extend([record.positions[j] for j in rows])
                run[3].extend([min(record.ts_ms[j], record.received_ms) for j in rows])
        for scope, run in runs.items():
            self._apply(scope, run, outcomes, changed)
        await self.guard.after_batch()

        # Dead letters and forwarded records reach the broker before the changelog says
        # their records are applied: a crash in between redelivers those records, which
        # are then handled again, never skipped.
        await self.output.deliver(sent)

        # One changelog record per changed scope per batch, not per event, written to the
        # partition of the events that changed it (so it recovers with them); each
        # partition's next offset last, as it is only valid once those are in.
        data = self.table.data
        changelog = [await self.output.changelog(scope, data[scope], partition)
                     for scope, partition in sorted(changed.items(), key=lambda item: item[0].startswith("__"))]

        if touched:
            await self.backend.write(await self._writes(touched, released))
            DECISIONS.inc(len(touched))
        if time.monotonic() >= self._next_sweep:
            changelog += await self._forget_idle_scopes()
        # The batch is acknowledged (and its offsets become committable) when this
        # returns, so its changelog must be on the broker by then. Faust's own flush
        # before a commit gives up after 0.1 s per message.
        await self.output.deliver(changelog)
        for outcome, n in outcomes.items():
            EVENTS.labels(outcome).inc(n)
        BATCH_SECONDS.observe(time.perf_counter() - started)

    def _apply(self, scope: str, run: tuple[int, list[int], list[int], list[int]], outcomes: Counter[str],
               changed: dict[str, int]) -> None:
        """Count a run of one scope's events; the outcomes are counted once, by their keys."""
        partition, ts_ms, positions, clocks = run
        data = self.table.data
        counted, state = apply_events(data.get(scope), ts_ms, partition, positions, self.policy, clocks)
        if scope.startswith(KEY_SCOPE):
            for outcome, n in counted.items():
                outcomes[outcome] += n
        if state is not None:
            data[scope] = state
            changed[scope] = partition

    async def _read(self, msg: Any, verdict: str, outcomes: Counter[str], sent: list[Sent]) -> "_Record | None":
        """The events of a record that count here (valid, not refused by a limiter, on
        their org's partition), as columns. Invalid ones are dead-lettered and events on
        another partition forwarded to theirs, unless the record was handled before."""
        # Times are judged against the broker's time of the record (LogAppendTime): the
        # same for every stage, every replay.
        received_ms = round(msg.timestamp * 1000)
        if msg.timestamp_type != LOG_APPEND_TIME and not self._warned_create_time:
            self._warned_create_time = True
            log.error("the events topic keeps the publishers' record times (CreateTime): a publisher can then "
                      "choose the time its events are judged against; set message.timestamp.type=LogAppendTime "
                      "on it ('quotaflow stack up' does)", extra={"topic": msg.topic})
        columns, indexes, refused = decode_columns(msg.value, received_ms, self.bounds)
        for index, exc in refused:
            if verdict == APPLY:
                outcomes[exc.kind] += 1
                sent.append(await self._dead_letter(msg, exc, index))
            else:
                outcomes[REDELIVERED] += 1
        if not indexes:
            return None
        org = columns[_ORG][0]
        home = partition_of(org, self.partitions)
        if msg.partition != home:
            if verdict == APPLY:
                outcomes[FORWARDED] += len(indexes)
                sent.append(await self._forward(msg, org, columns, home))
            else:
                outcomes[REDELIVERED] += len(indexes)
            return None
        status = columns[_STATUS]
        rows: Sequence[int] = range(len(status))
        if REJECTED_STATUS in status:  # refused by a limiter: counting it would lock retrying clients out
            rows = [j for j, s in enumerate(status) if s != REJECTED_STATUS]
            outcomes["rejected"] += len(status) - len(rows)
            if not rows:
                return None
        base = position(msg.offset, 0)
        return _Record.of(msg.partition, received_ms, org, columns[_KEY], columns[_TS], columns[_EVENT_ID],
                          [base | index for index in indexes], rows)

    async def _forward(self, msg: Any, org: str, columns: tuple[tuple, ...], home: int) -> Sent:
        """The valid events of a record published on another partition than its org's,
        to that partition, to be counted there (the sink stores the original only)."""
        log.warning("events on another partition than their org's; forwarding them (publish keyed by org_id "
                    "with Kafka's default murmur2 partitioner to avoid this)",
                    extra={"org_id": org, "partition": msg.partition, "offset": msg.offset, "home": home})
        value = orjson.dumps([dict(zip(FIELD_NAMES, row)) for row in zip(*columns)])
        origin = f"{msg.topic}/{msg.partition}/{msg.offset}".encode()
        return await self.output.forward(partition_key(org), value, home, [(FORWARDED_HEADER, origin)])

    async def _writes(self, touched: dict[tuple[str, str], int], released: dict[tuple[str, str], list[str]]
                      ) -> list[ScopeWrite]:
        """Counts, durable decisions and reservation releases of every key and org touched."""
        data, policy = self.table.data, self.policy
        tiers, overrides = await self.backend.limits_config(set(touched))
        now = int(time.time() * 1000)
        writes = []
        orgs: dict[str, list[str]] = {}  # org -> its events' reservations
        windows = {org: org_windows(data.get(org_scope(org)), policy, tiers[org], now) for org in tiers}
        for (org, key), _ in touched.items():
            kstate = data.get(key_scope(org, key))
            decision = decide(kstate, windows[org], policy, tiers[org], overrides[(org, key)], now)
            writes.append(ScopeWrite(org, key, kstate["b"] if kstate else None, decision, released[(org, key)]))
            orgs.setdefault(org, []).extend(released[(org, key)])
        for org, ids in orgs.items():
            ostate = data.get(org_scope(org))
            decision = decide_org(windows[org], policy, tiers[org], now)
            writes.append(ScopeWrite(org, None, ostate["b"] if ostate else None, decision, ids))
        return writes

    async def _forget_idle_scopes(self) -> list[Sent]:
        """Drop scopes idle for longer than their longest window and the grace after it:
        their counts can no longer matter, and the table (and its recovery) stays the
        size of the active keys. Runs inside a batch, so nothing else changes the table."""
        self._next_sweep = time.monotonic() + SWEEP_EVERY_S
        horizon = max(w.length_ms for w in self.policy.windows) + self.policy.late_grace_ms
        cutoff = int(time.time() * 1000) - horizon
        data = self.table.data
        idle = [(k, v["p"]) for k, v in list(data.items()) if not k.startswith("__") and v["m"] < cutoff]
        sent = []
        for key, partition in idle:
            del data[key]
            sent.append(await self.output.changelog(key, None, partition))
        if idle:
            log.info("idle scopes forgotten", extra={"scopes": len(idle)})
        return sent

    async def _dead_letter(self, msg: Any, exc: SchemaError, index: int | None) -> Sent:
        log.warning("invalid event dead-lettered",
                    extra={"reason": str(exc)[:500], "partition": msg.partition, "offset": msg.offset, "index": index})
        return await self.output.dead_letter(
            msg.key, msg.value if exc.payload is None else exc.payload,
            deadletter.headers(str(exc), deadletter.STAGE_PROCESSOR, topic=msg.topic, partition=msg.partition,
                               offset=msg.offset, index=index, ts_ms=int(time.time() * 1000)))


class _DuplicateChecks:
    """A batch's duplicate check, sent in parts while the rest of the batch is still being
    read, so that Redis answers one part while Python reads the next records. The parts
    reach Redis one after another, in order, as a single call would."""

    PART_EVENTS = 10_000

    def __init__(self, backend: RedisBackend):
        self.backend = backend
        self._parts: list[asyncio.Future] = []
        self._records: list[_Record] = []
        self._events = 0

    def add(self, record: "_Record") -> None:
        self._records.append(record)
        self._events += len(record.rows)
        if self._events >= self.PART_EVENTS:
            self._send()

    async def results(self) -> list[bool]:
        """Per event of the records added, in their order: already counted from another record?"""
        self._send()
        return list(itertools.chain.from_iterable(await asyncio.gather(*self._parts)))

    def cancel(self) -> None:
        for part in self._parts:
            part.cancel()

    def _send(self) -> None:
        if self._records:
            groups = [(r.org_id, r.partition, *r.row_values()) for r in self._records]
            self._parts.append(asyncio.ensure_future(self._check(self._parts[-1] if self._parts else None, groups)))
            self._records, self._events = [], 0

    async def _check(self, previous: asyncio.Future | None, groups: list) -> list[bool]:
        if previous is not None:
            await previous
        return await self.backend.duplicates(groups)


_EVENT_ID, _TS, _ORG, _KEY, _STATUS = (FIELD_NAMES.index(name) for name in
                                        ("event_id", "ts_ms", "org_id", "api_key_id", "status"))


class _Record(NamedTuple):
    """A record's events that count, as columns: ``rows`` says which of the columns' rows."""

    partition: int
    received_ms: int  # when the broker received the record: caps how far its events move clocks
    org_id: str  # a record carries one org's events
    api_key_ids: tuple[str, ...]
    ts_ms: tuple[int, ...]
    event_ids: tuple[str, ...]
    positions: list[int]
    rows: Sequence[int]
    keys: dict[str, list[int]]  # the rows of each API key

    @classmethod
    def of(cls, partition: int, received_ms: int, org_id: str, api_key_ids: tuple[str, ...], ts_ms: tuple[int, ...],
           event_ids: tuple[str, ...], positions: list[int], rows: Sequence[int]) -> "_Record":
        if len(set(api_key_ids)) == 1:
            keys = {api_key_ids[0]: list(rows)}
        else:
            keys = {}
            for j in rows:
                keys.setdefault(api_key_ids[j], []).append(j)
        return cls(partition, received_ms, org_id, api_key_ids, ts_ms, event_ids, positions, rows, keys)

    def row_values(self) -> tuple[Sequence[int], Sequence[str], Sequence[int]]:
        """Event times, event ids and positions of the rows, for the duplicate check."""
        if isinstance(self.rows, range):  # all of them
            return self.ts_ms, self.event_ids, self.positions
        return ([self.ts_ms[j] for j in self.rows], [self.event_ids[j] for j in self.rows],
                [self.positions[j] for j in self.rows])

    def without(self, rows: list[int]) -> "_Record":
        drop = set(rows)
        return _Record.of(*self[:7], [j for j in self.rows if j not in drop])


def create_app(settings: Settings) -> faust.App:
    policy = policy_from_settings(settings)
    app = faust.App(
        PROCESSOR_APP_ID,
        broker=[f"kafka://{host}" for host in settings.kafka_bootstrap.split(",")],
        store="memory://",
        topic_partitions=settings.events_partitions,
        topic_replication_factor=1,
        web_enabled=False,
        consumer_auto_offset_reset="earliest",
        producer_acks=-1,
        broker_commit_interval=settings.processor_commit_interval_s,
        # After a broker restart the first rebalance can see topics without
        # leaders and assign nothing; fresh metadata within seconds makes the
        # group leader notice and rebalance again (default: 5 minutes).
        consumer_metadata_max_age_ms=5000,
        # A worker killed without leaving the group holds its partitions until
        # its session times out; Faust's default of 60 s stalls a restart that long.
        broker_session_timeout=15.0,
        # Batches of thousands: fetch and buffer that much at a time.
        broker_max_poll_records=settings.processor_batch_size * 2,
        stream_buffer_maxsize=settings.processor_batch_size * 4,
        consumer_max_fetch_size=8 * 1024 * 1024,
    )
    events_topic = app.topic(EVENTS_TOPIC, key_type=bytes, value_type=bytes,
                             key_serializer="raw", value_serializer="raw",
                             partitions=settings.events_partitions)
    table = app.Table(TABLE_NAME, default=None, partitions=settings.events_partitions,
                      schema=faust.Schema(key_type=str, key_serializer="json", value_serializer="json"),
                      # Every batch rewrites the scopes it touches: roll segments often so the log
                      # cleaner compacts them, and a restart recovers one record per scope, not
                      # one per batch.
                      extra_topic_configs={"segment.ms": str(5 * 60_000), "min.cleanable.dirty.ratio": "0.1"})

    running: dict[str, RequestCounter] = {}

    @app.on_rebalance_complete.connect
    async def _ready(sender: Any, **kwargs: Any) -> None:
        if "counter" in running:
            running["counter"].guard.reset()
        READY.set(1)

    @app.timer(1.0)
    async def _reseek() -> None:
        if "counter" in running:
            counter = running["counter"]
            partitions = app.consumer.topic_partitions(EVENTS_TOPIC)
            if partitions and partitions != counter.partitions:  # partitions added: orgs move (counts restart)
                log.warning("the events topic's partition count changed; orgs are counted on their new partitions",
                            extra={"before": counter.partitions, "after": partitions})
                counter.partitions = partitions
            guard = counter.guard
            await guard.reseek_stale()
            assigned = [tp.partition for tp in app.consumer.assignment() if tp.topic == EVENTS_TOPIC]
            if assigned:
                try:
                    ends = await running["probe"].end_offsets(assigned)
                except KafkaError as exc:  # a broker restart: look again next time
                    log.debug("end offsets unavailable", extra={"error": str(exc)})
                    return
                await guard.unstick(ends)
                backlog = guard.backlog(ends)
                BACKLOG.set(float("nan") if backlog is None else backlog)

    @app.agent(events_topic)
    async def count_requests(stream: faust.StreamT) -> None:
        redis = aioredis.Redis.from_url(settings.redis_url)
        probe = OffsetProbe(settings.kafka_bootstrap, EVENTS_TOPIC)
        await probe.start()
        output = Output(settings.kafka_bootstrap, table.changelog_topic.get_topic_name(), DEAD_LETTER_TOPIC,
                        EVENTS_TOPIC)
        await output.start()

        async def seek(partition: int, offset: int) -> None:
            log.warning("records skipped by the stream; seeking back", extra={"partition": partition, "offset": offset})
            await seek_stream(app, TP(EVENTS_TOPIC, partition), offset)

        running["probe"] = probe
        backend = RedisBackend(redis, policy, dedup_window_s=settings.dedup_window_s)
        counter = running["counter"] = RequestCounter(table, output, backend,
                                                      OffsetGuard(table.data, probe.first_offset, seek),
                                                      time_bounds_from_settings(settings),
                                                      await events_partitions(app))
        try:
            async for batch in stream.take_events(settings.processor_batch_size,
                                                  within=settings.processor_batch_seconds):
                await counter.handle(batch)
        except stopping.Stopped:
            log.info("stopping: the batch in progress is left unacknowledged, to be read again")
        finally:
            running.pop("counter", None)
            running.pop("probe", None)
            await output.stop()
            await probe.stop()
            await redis.aclose()

    return app


class Worker(faust.Worker):
    """Faust's worker, stopping within seconds when asked (SIGTERM, SIGINT).

    The retry loops give up the batch in progress (processors/stopping.py), and the
    consumer no longer waits for every event taken from the stream to be acknowledged:
    events it took and never handed out would keep it waiting for ever. Unacknowledged
    records are read again after the restart, which the table recognises. On a
    rebalance it still waits (stream_wait_empty), so a batch of a revoked partition
    ends before its next owner recovers the table."""

    def _schedule_shutdown(self, signal: Any) -> None:
        stopping.request()
        with warnings.catch_warnings():  # "reconfiguring late": deliberate, for the shutdown only
            warnings.simplefilter("ignore")
            self.app.conf.stream_wait_empty = False
        super()._schedule_shutdown(signal)


async def events_partitions(app: faust.App) -> int:
    """Partitions of the events topic, as the group's last rebalance saw them (the
    agent's first batch comes after that rebalance)."""
    while not (partitions := app.consumer.topic_partitions(EVENTS_TOPIC)):
        await asyncio.sleep(0.1)
    return partitions


async def seek_stream(app: faust.App, tp: TP, offset: int) -> None:
    """Seek the agent's stream back to ``offset``. Faust runs its aiokafka consumer in a
    thread of its own, and its Consumer.seek calls that consumer from ours: the fetcher,
    between listing and reading its fetched partitions, then finds one gone (KeyError in
    fetched_records, which stops the worker). seek_wait runs the seek in the consumer's
    thread. A partition revoked meanwhile cannot be sought: the guard repeats seeks that
    did not take, and a rebalance repositions the stream anyway."""
    try:
        await app.consumer.seek_wait({tp: offset})
    except (KafkaError, asyncio.TimeoutError, AssertionError) as exc:
        log.warning("seek failed; it will be repeated", extra={"partition": tp.partition, "error": repr(exc)})


class OffsetProbe:
    """Asks the broker which record really comes next in a partition (for OffsetGuard)."""

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

    async def first_offset(self, partition: int, offset: int) -> int | None:
        tp = TopicPartition(self.topic, partition)
        self._consumer.assign([tp])
        self._consumer.seek(tp, offset)
        for _ in range(10):
            records = (await self._consumer.getmany(tp, timeout_ms=500, max_records=1)).get(tp)
            if records:
                return records[0].offset
        return None
