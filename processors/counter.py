"""The processor's work on one batch of events, apart from the consumer's plumbing (consumer.py):
counts per API key and per org in every window of the policy, counts and decisions
written to Redis, the gateways' reservations of the counted events released, invalid
events dead-lettered. In three steps, so that a batch's waits overlap another's work:
read (records taken apart, the duplicate check sent), count (into the table; decisions
taken, writes encoded) and finish (writes sent and acknowledged).

Guarantee: at-least-once delivery, idempotent effect. A batch is acknowledged
(its offsets become committable) only once its counts are in Redis and its
changelog records, dead letters and forwarded records are on the broker (dead
letters and forwarded records first: the changelog then says the batch is applied).
The table also holds each partition's next offset: records delivered twice or
skipped are caught by OffsetGuard; records redelivered after a crash are
recognised by their offset and not counted twice (window_counts keeps, per subject,
the last offset applied). An event published twice (same event_id, two records)
is counted once if the copies arrive within the dedup window. Events with status
429 (refused by a limiter) are never counted.

Counts are kept per subject, (org, key) and org (subjects.py), each on its org's
partition (schemas.events.partition_of): a record a publisher put on another
partition (another partitioner, another key) is forwarded there and counted from
there, so every count lives in exactly one partition, whoever publishes.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from typing import Awaitable, Callable, NamedTuple, Sequence

import orjson
from aiokafka import ConsumerRecord

from quotaflow.processors.backend import RedisBackend, SubjectWrite
from quotaflow.processors.decisions import decide, decide_org, org_windows
from quotaflow.processors.duplicate_checks import BatchDuplicateChecks
from quotaflow.processors.metrics import BATCH_SECONDS, DECISIONS, EVENTS
from quotaflow.processors.offset_guard import APPLY, REFETCH, OffsetGuard, next_offset_key
from quotaflow.processors.output import Output, Sent
from quotaflow.processors.records import EVENT_ID, KEY, ORG, STATUS, TS, OneEventRecords, Record
from quotaflow.processors.subjects import is_key_subject, key_subject, org_subject
from quotaflow.processors.table import Table
from quotaflow.processors.window_counts import REDELIVERED, apply_events
from quotaflow.schemas import deadletter
from quotaflow.schemas.dedup import position
from quotaflow.schemas.events import (
    FIELD_NAMES,
    FORWARDED_HEADER,
    SchemaError,
    TimeBounds,
    decode_columns,
    decode_one,
    partition_key,
    partition_of,
)

log = logging.getLogger(__name__)

REJECTED_STATUS = 429
LOG_APPEND_TIME = 1  # a record's timestamp type: stamped by the broker on arrival
SWEEP_EVERY_S = 60.0
DUPLICATE = "duplicate"  # the same event_id already counted from another record
FORWARDED = "forwarded"  # events of a record on another partition than their org's

Run = tuple[int, list[int], list[int], list[int]]  # a subject's events in a batch: partition, times, positions, clocks


class Reading(NamedTuple):
    """A batch read (RequestCounter.read), to be counted (RequestCounter.count)."""

    started: float  # perf_counter
    touched: dict[tuple[str, str], int]  # (org_id, api_key_id) -> partition
    released: dict[tuple[str, str], list[str]]  # reservations to release, per key
    changed: dict[str, int]  # table key -> partition
    offsets: dict[str, int]  # each partition's next offset (its table key), as the batch leaves it
    sent: list[Sent]  # dead letters and forwarded records, on their way to the broker
    fresh: list[Record]  # records whose events were not applied before
    checks: BatchDuplicateChecks  # on their way
    outcomes: Counter[str]

    def cancel(self) -> None:
        """Given up before it is counted (the process stops)."""
        self.checks.cancel()


class RequestCounter:
    """Handles one batch of events. ``clock``: the wall clock, in seconds, that decisions
    are taken at and idle subjects judged by (event times are the events' own).
    ``before_writes``: called before the batch writes counts or changelog records."""

    def __init__(self, table: Table, output: Output, backend: RedisBackend, guard: OffsetGuard,
                 bounds: TimeBounds, partitions: int, clock: Callable[[], float] = time.time,
                 before_writes: Callable[[], Awaitable[None]] | None = None):
        self.table = table
        self.output = output
        self.backend = backend
        self.policy = backend.policy
        self.guard = guard
        self.bounds = bounds
        self.partitions = partitions  # of the events topic: where each org is counted
        self.clock = clock
        self.before_writes = before_writes  # stall_watch.py: no writes from a batch frozen or expelled past its session
        self._warned_create_time = False
        self._next_sweep = time.monotonic() + SWEEP_EVERY_S

    def _now_ms(self) -> int:
        return int(self.clock() * 1000)

    async def read(self, records: Sequence[ConsumerRecord]) -> Reading:
        """Take a batch's records apart into the events that count, their duplicate check on
        its way to Redis; dead letters and forwarded records handed to the producer. Nothing
        is counted yet (count): the next batch may be read while Redis checks this one."""
        started = time.perf_counter()
        touched: dict[tuple[str, str], int] = {}  # (org_id, api_key_id) -> partition
        released: dict[tuple[str, str], list[str]] = {}  # reservations to release, per key
        changed: dict[str, int] = {}  # table key -> partition
        sent: list[Sent] = []  # dead letters and forwarded records, on their way to the broker
        fresh: list[Record] = []  # records whose events were not applied before
        checks = BatchDuplicateChecks(self.backend)
        outcomes: Counter[str] = Counter()
        seen_partitions: set[int] = set()  # those of the batch so far: each one's next offset changes
        gathered: dict[int, dict[str, OneEventRecords]] = {}  # partition -> org -> its one-event records so far

        def take(record: Record, verdict: str) -> None:
            for key, rows in record.keys.items():
                ident = (record.org_id, key)
                touched[ident] = record.partition
                released.setdefault(ident, []).extend([record.event_ids[j] for j in rows])
            if verdict == REDELIVERED:
                outcomes[REDELIVERED] += len(record.rows)
            else:
                fresh.append(record)
                checks.add(record)

        try:
            for msg in records:
                partition = msg.partition
                verdict = self.guard.quick(partition, msg.offset) or await self.guard.check(partition, msg.offset)
                if verdict == REFETCH:
                    outcomes["refetch"] += 1
                    continue
                if partition not in seen_partitions:
                    seen_partitions.add(partition)
                    changed[next_offset_key(partition)] = partition
                if verdict == APPLY:
                    values = self._one_event(msg)
                    if values is not None:
                        if values[STATUS] == REJECTED_STATUS:  # see _read
                            outcomes["rejected"] += 1
                            continue
                        orgs = gathered.get(partition)
                        if orgs is None:
                            orgs = gathered[partition] = {}
                        one = orgs.get(values[ORG])
                        if one is None:
                            one = orgs[values[ORG]] = OneEventRecords(partition, values[ORG])
                        one.add(values, position(msg.offset, 0), msg.timestamp)
                        continue
                if partition in gathered:  # a partition's events in order: those gathered before this record first
                    for one in gathered.pop(partition).values():
                        take(one.record(), APPLY)
                record = await self._read(msg, verdict, outcomes, sent)
                if record is not None:
                    take(record, verdict)
            for orgs in gathered.values():
                for one in orgs.values():
                    take(one.record(), APPLY)
            await self.guard.after_batch()
        except BaseException:
            checks.cancel()
            raise
        data = self.table.data
        offsets = {key: data[key] for key in changed}  # as this batch leaves them: the next one moves them on
        return Reading(started, touched, released, changed, offsets, sent, fresh, checks, outcomes)

    async def count(self, reading: Reading) -> tuple[int, Callable[[], Awaitable[None]]]:
        """Count a batch read into the table, take its decisions and encode all it writes;
        return how many events its records carried (all outcomes) and its finish, which
        writes it (Redis, the changelog; dead letters and forwarded records before) and
        returns once all of it is acknowledged. What the finish sends is fixed here,
        whatever later batches change: the next batch may be counted while this one
        finishes, and finishes after it (consumer.py)."""
        started, touched, released, changed, offsets, sent, fresh, checks, outcomes = reading
        try:
            duplicate = await checks.results()
        finally:
            checks.cancel()
        runs: dict[str, Run] = {}  # table key of a subject -> its run
        done = 0
        for record in fresh:
            dups = duplicate[done:done + len(record.rows)]
            done += len(record.rows)
            if any(dups):
                outcomes[DUPLICATE] += sum(dups)
                record = record.without([j for j, dup in zip(record.rows, dups, strict=True) if dup])
                if not record.rows:
                    continue
            subjects = [(org_subject(record.org_id), record.rows)]
            subjects += [(key_subject(record.org_id, key), rows) for key, rows in record.keys.items()]
            everything = isinstance(record.rows, range) and len(record.rows) == len(record.ts_ms)
            for subject, rows in subjects:
                run = runs.get(subject)
                if run is not None and run[0] != record.partition:  # a subject that moved partition: in order
                    self._apply(subject, run, outcomes, changed)
                    run = None
                if run is None:
                    run = runs[subject] = (record.partition, [], [], [])
                if everything and rows is record.rows:
                    run[1].extend(record.ts_ms)
                    run[2].extend(record.positions)
                    run[3].extend(record.clocks)
                else:
                    run[1].extend([record.ts_ms[j] for j in rows])
                    run[2].extend([record.positions[j] for j in rows])
                    run[3].extend([record.clocks[j] for j in rows])
        for subject, run in runs.items():
            self._apply(subject, run, outcomes, changed)

        # One changelog record per changed subject per batch, not per event, written to
        # the partition of the events that changed it (so it recovers with them); each
        # partition's next offset after them, as it is only valid once those are in.
        data = self.table.data
        table_records = [(subject, data[subject], partition) for subject, partition in changed.items()
                         if not subject.startswith("__")]
        table_records += [(key, offsets[key], partition) for key, partition in changed.items() if key.startswith("__")]
        if time.monotonic() >= self._next_sweep:
            table_records += self._forget_idle_subjects()
        changelog = self.output.encode_changelogs(table_records)
        calls = self.backend.prepare_write(await self.writes(touched, released)) if touched else []
        for outcome, n in outcomes.items():
            EVENTS.labels(outcome).inc(n)

        async def finish() -> None:
            # Dead letters and forwarded records reach the broker before the changelog says
            # their records are applied: a crash in between redelivers those records, which
            # are then handled again, never skipped.
            await self.output.deliver(sent)
            if self.before_writes is not None:
                await self.before_writes()
            on_its_way = await self.output.send_changelogs(changelog)
            if calls:
                await self.backend.send_write(calls)
                DECISIONS.inc(len(touched))
            # The batch's offsets become committable when this returns, so its changelog
            # must be on the broker by then.
            await self.output.deliver(on_its_way)
            BATCH_SECONDS.observe(time.perf_counter() - started)

        return sum(outcomes.values()) - outcomes["refetch"], finish  # refetches count records, to be read again

    def _apply(self, subject: str, run: Run, outcomes: Counter[str], changed: dict[str, int]) -> None:
        """Count a run of one subject's events; the outcomes are counted once, by their keys."""
        partition, ts_ms, positions, clocks = run
        data = self.table.data
        counted, state = apply_events(data.get(subject), ts_ms, partition, positions, self.policy, clocks)
        if is_key_subject(subject):
            for outcome, n in counted.items():
                outcomes[outcome] += n
        if state is not None:
            data[subject] = state
            changed[subject] = partition

    async def _read(self, msg: ConsumerRecord, verdict: str, outcomes: Counter[str], sent: list[Sent]) -> Record | None:
        """The events of a record that count here (valid, not refused by a limiter, on
        their org's partition), as columns. Invalid ones are dead-lettered and events on
        another partition forwarded to theirs, unless the record was handled before."""
        # Times are judged against the broker's time of the record (LogAppendTime): the
        # same for every stage, every replay.
        received_ms = msg.timestamp
        if msg.timestamp_type != LOG_APPEND_TIME:
            self._warn_create_time(msg)
        columns, indexes, refused = decode_columns(msg.value, received_ms, self.bounds)
        for index, exc in refused:
            if verdict == APPLY:
                outcomes[exc.kind] += 1
                sent.append(await self._dead_letter(msg, exc, index))
            else:
                outcomes[REDELIVERED] += 1
        if not indexes:
            return None
        org = columns[ORG][0]
        home = partition_of(org, self.partitions)
        if msg.partition != home:
            if verdict == APPLY:
                outcomes[FORWARDED] += len(indexes)
                sent.append(await self._forward(msg, org, columns, home))
            else:
                outcomes[REDELIVERED] += len(indexes)
            return None
        status = columns[STATUS]
        rows: Sequence[int] = range(len(status))
        if REJECTED_STATUS in status:  # refused by a limiter: counting it would lock retrying clients out
            rows = [j for j, s in enumerate(status) if s != REJECTED_STATUS]
            outcomes["rejected"] += len(status) - len(rows)
            if not rows:
                return None
        base = position(msg.offset, 0)
        ts_ms = columns[TS]
        clocks = ts_ms if max(ts_ms) <= received_ms else [min(ts, received_ms) for ts in ts_ms]
        return Record.of(msg.partition, org, columns[KEY], ts_ms, columns[EVENT_ID],
                         [base | index for index in indexes], clocks, rows)

    def _one_event(self, msg: ConsumerRecord) -> tuple | None:
        """The values of a record holding one valid event, in time and on its org's
        partition (the usual one-event record), without building columns for it; None for
        any other record, which _read takes the general way and words what is wrong."""
        values = decode_one(msg.value)
        if (values is None or self.bounds.kind(values[TS], msg.timestamp) is not None
                or partition_of(values[ORG], self.partitions) != msg.partition):
            return None
        if msg.timestamp_type != LOG_APPEND_TIME:
            self._warn_create_time(msg)
        return values

    def _warn_create_time(self, msg: ConsumerRecord) -> None:
        if not self._warned_create_time:
            self._warned_create_time = True
            log.error("the events topic keeps the publishers' record times (CreateTime): a publisher can then "
                      "choose the time its events are judged against; set message.timestamp.type=LogAppendTime "
                      "on it ('quotaflow stack up' does)", extra={"topic": msg.topic})

    async def _forward(self, msg: ConsumerRecord, org: str, columns: tuple[tuple, ...], home: int) -> Sent:
        """The valid events of a record published on another partition than its org's,
        to that partition, to be counted there (the sink stores the original only)."""
        log.warning("events on another partition than their org's; forwarding them (publish keyed by org_id "
                    "with Kafka's default murmur2 partitioner to avoid this)",
                    extra={"org_id": org, "partition": msg.partition, "offset": msg.offset, "home": home})
        value = orjson.dumps([dict(zip(FIELD_NAMES, row)) for row in zip(*columns)])
        origin = f"{msg.topic}/{msg.partition}/{msg.offset}".encode()
        return await self.output.forward(partition_key(org), value, home, [(FORWARDED_HEADER, origin)])

    async def writes(self, touched: dict[tuple[str, str], int], released: dict[tuple[str, str], list[str]]
                     ) -> list[SubjectWrite]:
        """Counts, durable decisions (taken at the clock's time) and reservation releases
        of every (org, key) touched and their orgs, from the table as it stands."""
        data, policy = self.table.data, self.policy
        tiers, overrides = await self.backend.limits_config(set(touched))
        now = self._now_ms()
        writes = []
        orgs: dict[str, list[str]] = {}  # org -> its events' reservations
        windows = {org: org_windows(data.get(org_subject(org)), policy, tiers[org], now) for org in tiers}
        for (org, key), _ in touched.items():
            kstate = data.get(key_subject(org, key))
            decision = decide(kstate, windows[org], policy, tiers[org], overrides[(org, key)], now)
            writes.append(SubjectWrite(org, key, kstate["b"] if kstate else None, decision, released[(org, key)],
                                       (kstate["p"], kstate["o"]) if kstate else None))
            orgs.setdefault(org, []).extend(released[(org, key)])
        for org, ids in orgs.items():
            ostate = data.get(org_subject(org))
            decision = decide_org(windows[org], policy, tiers[org], now)
            writes.append(SubjectWrite(org, None, ostate["b"] if ostate else None, decision, ids,
                                       (ostate["p"], ostate["o"]) if ostate else None))
        return writes

    def _forget_idle_subjects(self) -> list[tuple[str, None, int]]:
        """Drop subjects idle for longer than their longest window and the grace after it:
        their counts can no longer matter, and the table (and its recovery) stays the
        size of the active keys. Runs inside a batch, so nothing else changes the table.
        Returns the changelog's deletions of them."""
        self._next_sweep = time.monotonic() + SWEEP_EVERY_S
        horizon = max(w.length_ms for w in self.policy.windows) + self.policy.late_grace_ms
        cutoff = self._now_ms() - horizon
        data = self.table.data
        idle = [(k, v["p"]) for k, v in list(data.items()) if not k.startswith("__") and v["m"] < cutoff]
        for key, _ in idle:
            del data[key]
        if idle:
            log.info("idle subjects forgotten", extra={"subjects": len(idle)})
        return [(key, None, partition) for key, partition in idle]

    async def _dead_letter(self, msg: ConsumerRecord, exc: SchemaError, index: int | None) -> Sent:
        log.warning("invalid event dead-lettered",
                    extra={"reason": str(exc)[:500], "partition": msg.partition, "offset": msg.offset, "index": index})
        return await self.output.dead_letter(
            msg.key, msg.value if exc.payload is None else exc.payload,
            deadletter.headers(str(exc), deadletter.STAGE_PROCESSOR, topic=msg.topic, partition=msg.partition,
                               offset=msg.offset, index=index, ts_ms=self._now_ms()))
